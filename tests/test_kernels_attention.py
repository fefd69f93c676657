import pytest
import torch

from kernels_util import TOL, fresh_seed, kernel_device, rel_err  # noqa: F401 (fresh_seed: autouse fixture)
import tidal.kernels as K
from tidal.errors import BackendError, ConfigError, ShapeError

# (dtype, head_dim, block_size, num_heads, num_kv_heads): every tested head_dim, block size and dtype, and GQA
# groups of 1, 3 (12 over 4, not a power of two), 4 and 8 appear at least once; block 24 is not a power of
# two, so a 64-token tile holds two blocks and a part of a third
CONFIGS = [
    (torch.float32, 64, 8, 4, 4),
    (torch.float16, 80, 16, 8, 2),
    (torch.bfloat16, 128, 8, 8, 1),
    (torch.float32, 80, 16, 12, 4),
    (torch.bfloat16, 64, 16, 12, 4),
    (torch.float16, 128, 8, 4, 1),
    (torch.float16, 64, 24, 8, 2),
]


def make_case(dtype, head_dim, block_size, num_heads, num_kv_heads, lens, device):
    """Random q and paged K/V behind shuffled block tables. Every block no sequence uses, every slot past a
    sequence's end in its last block, and every padded table entry's block hold NaN, so a read past a
    sequence's end poisons the output."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in lens]
    max_blocks = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 5
    perm = torch.randperm(num_blocks)
    nan_block = int(perm[-1])
    tables = torch.full((len(lens), max_blocks), nan_block, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k, v = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    used = 0
    for b, (n, nb) in enumerate(zip(lens, blocks_per_seq)):
        ids = perm[used:used + nb]
        used += nb
        tables[b, :nb] = ids.to(torch.int32)
        for cache in (k, v):
            tokens = torch.full((nb * block_size, num_kv_heads, head_dim), float("nan"))
            tokens[:n] = torch.randn(n, num_kv_heads, head_dim)
            cache[ids] = tokens.view(nb, block_size, num_kv_heads, head_dim).to(dtype)
    q = torch.randn(len(lens), num_heads, head_dim).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(tables), to(torch.tensor(lens, dtype=torch.int32))


def float64_reference(q, k, v, tables, lens):
    q, k, v = (t.double().cpu() for t in (q, k, v))
    return K.reference.paged_decode_attention(q, k, v, tables.cpu(), lens.cpu(), q.shape[-1] ** -0.5,
                                              compute_dtype=torch.float64)


@pytest.mark.parametrize("dtype, head_dim, block_size, num_heads, num_kv_heads", CONFIGS)
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_paged_decode_matches_float64(dtype, head_dim, block_size, num_heads, num_kv_heads, num_splits):
    device = kernel_device()
    bs = block_size
    for lens in ([1, bs - 1, bs, bs + 1, 301, 2 * bs + 3, 5], [bs + 1]):  # batch 7, then batch 1
        q, k, v, tables, seq_lens = make_case(dtype, head_dim, bs, num_heads, num_kv_heads, lens, device)
        out = torch.full_like(q, float("nan"))
        got = K.paged_decode_attention(q, k, v, tables, seq_lens, out=out, num_splits=num_splits)
        assert got is out and got.dtype == dtype
        assert torch.isfinite(got).all(), lens
        want = float64_reference(q, k, v, tables, seq_lens)
        assert rel_err(got.cpu(), want) <= TOL[dtype], (lens, num_splits)


# head dims 8 and 12 are below tl.dot's smallest K (16 for fp16/bf16), padded by the kernel; block 128 is
# larger than a tile, so a tile covers part of a block
@pytest.mark.parametrize("dtype, head_dim, block_size, num_heads, num_kv_heads",
                         [(torch.float16, 96, 32, 8, 8), (torch.bfloat16, 256, 16, 4, 2),
                          (torch.float32, 96, 32, 6, 2), (torch.float32, 8, 16, 4, 4),
                          (torch.float16, 12, 8, 6, 2), (torch.bfloat16, 8, 32, 8, 1),
                          (torch.float16, 8, 16, 3, 1), (torch.bfloat16, 64, 128, 8, 2)])
def test_other_supported_shapes(dtype, head_dim, block_size, num_heads, num_kv_heads):
    q, k, v, tables, lens = make_case(dtype, head_dim, block_size, num_heads, num_kv_heads, [1, 33, 70],
                                      kernel_device())
    want = float64_reference(q, k, v, tables, lens)
    for splits in (1, 3):
        got = K.paged_decode_attention(q, k, v, tables, lens, num_splits=splits)
        assert rel_err(got.cpu(), want) <= TOL[dtype]


def test_path_and_split_choice():
    assert K.path_for(torch.empty(1)) in ("triton-interpreter", "reference")
    assert K.choose_num_splits(batch=64, num_kv_heads=8, max_blocks=256, num_sms=132) == 1
    assert K.choose_num_splits(batch=16, num_kv_heads=8, max_blocks=256, num_sms=132) == 3
    assert K.choose_num_splits(batch=1, num_kv_heads=8, max_blocks=2048, num_sms=132) == 33
    assert K.choose_num_splits(batch=1, num_kv_heads=8, max_blocks=8, num_sms=132) == 2  # >= 4 blocks each
    assert K.choose_num_splits(batch=1, num_kv_heads=1, max_blocks=10**6, num_sms=132) == K.MAX_SPLITS


def test_scale_and_out_defaults():
    q, k, v, tables, lens = make_case(torch.float32, 64, 8, 4, 2, [13, 3], kernel_device())
    a = K.paged_decode_attention(q, k, v, tables, lens)
    b = K.paged_decode_attention(q, k, v, tables, lens, scale=0.125)  # 64 ** -0.5
    assert torch.equal(a, b)
    c = K.paged_decode_attention(q, k, v, tables, lens, scale=0.3)
    assert rel_err(c, a) > 1e-3  # the scale is used


def test_the_reference_path_can_be_forced():
    q, k, v, tables, lens = make_case(torch.float32, 64, 8, 4, 2, [13, 3], kernel_device())
    got = K.paged_decode_attention(q, k, v, tables, lens, path="reference")
    assert rel_err(got.cpu(), float64_reference(q, k, v, tables, lens)) <= TOL[torch.float32]
    assert K.resolve_path(q, "reference") == "reference"
    assert K.resolve_path(q, "triton") == K.path_for(q) != "reference"
    with pytest.raises(ConfigError, match="'cuda'"):
        K.paged_decode_attention(q, k, v, tables, lens, path="cuda")


def test_forcing_triton_where_nothing_runs_it_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # on a GPU machine it was never set
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        K.resolve_path(torch.empty(2), "triton")


def _good():
    return make_case(torch.float16, 64, 8, 8, 2, [9, 4], kernel_device())


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(q=a["q"].float()), r"mismatched dtypes: q \(2, 8, 64\) torch.float32"),
    (lambda a: a.update(q=a["q"].to("meta")), r"different devices: q \(2, 8, 64\) torch.float16 on meta"),
    (lambda a: a.update(q=a["q"][0]), r"q must have 3 dims, got \(8, 64\)"),
    (lambda a: a.update(block_tables=a["block_tables"][0]), r"block_tables must have 2 dims, got \(\d+,\)"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :1].contiguous()),
     r"k_cache \(\d+, 8, 1, 64\).* and v_cache .* differ"),
    (lambda a: a.update(q=a["q"][:, :7]),
     r"q \(2, 7, 64\) .*not a multiple of the 2 kv heads of k_cache \(\d+, 8, 2, 64\)"),
    (lambda a: a.update(seq_lens=torch.tensor([9, 33], dtype=torch.int32)),
     r"seq_lens\[1\]=33 outside \[1, 32\]: block_tables \(2, 4\) x block_size 8"),
    (lambda a: a.update(seq_lens=torch.tensor([0, 4], dtype=torch.int32)), r"seq_lens\[0\]=0"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1),
                        v_cache=a["v_cache"].transpose(0, 1).contiguous().transpose(0, 1)),
     r"k_cache must be contiguous, got \(\d+, 8, 2, 64\)"),
    (lambda a: a.update(block_tables=a["block_tables"].float()),
     r"block_tables must be int32 or int64, got \(2, 4\)"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), r"batch 2 from q, block_tables \(1, 4\)"),
    (lambda a: a.update(out=torch.empty(2, 8, 32, dtype=torch.float16)),
     r"out must match q .*got \(2, 8, 32\)"),
    (lambda a: a.update(num_splits=0), "num_splits=0"),
])
def test_bad_input_names_the_argument_and_shapes(mutate, match):
    q, k, v, tables, lens = _good()
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, seq_lens=lens, out=None)
    mutate(args)
    with pytest.raises(ShapeError, match=match):
        K.paged_decode_attention(**args)
