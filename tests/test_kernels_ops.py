import pytest
import torch

from kernels_util import TOL, fresh_seed, kernel_device, rel_err  # noqa: F401 (fresh_seed: autouse fixture)
import tidal.kernels as K
from tidal.errors import ShapeError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, block_size", [(64, 8), (80, 16), (128, 16)])
def test_write_kv_scatters_exact_bytes(dtype, head_dim, block_size):
    dev = kernel_device()
    num_blocks, num_kv_heads, tokens = 9, 3, 23
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=dev)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(torch.int32)
    slots[5] = K.PAD_SLOT_ID  # skipped
    key = torch.randn(tokens, num_kv_heads, head_dim).to(dtype)
    value = torch.randn(tokens, num_kv_heads, head_dim).to(dtype)
    K.write_kv(key.to(dev), value.to(dev), k_cache, v_cache, slots.to(dev))
    flat_k = k_cache.cpu().view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.cpu().view(-1, num_kv_heads, head_dim)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep].long()], key[keep]) and torch.equal(flat_v[slots[keep].long()], value[keep])
    untouched = torch.ones(len(flat_k), dtype=torch.bool)
    untouched[slots[keep].long()] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 80, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    dev = kernel_device()
    x = torch.randn(5, 3, hidden).to(dtype)
    w = torch.randn(hidden).to(dtype)
    r = torch.randn(5, 3, hidden).to(dtype) if with_residual else None
    got = K.rms_norm(x.to(dev), w.to(dev), 1e-6, None if r is None else r.to(dev))
    want = K.reference.rms_norm(x.double(), w.double(), 1e-6, None if r is None else r.double(),
                                compute_dtype=torch.float64)
    if with_residual:
        assert rel_err(got[0].cpu(), want[0]) <= TOL[dtype] and rel_err(got[1].cpu(), want[1]) <= TOL[dtype]
    else:
        assert got.dtype == dtype and rel_err(got.cpu(), want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, rot_dim", [(64, 64), (80, 80), (128, 64)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_in_place(dtype, head_dim, rot_dim, is_neox):
    dev = kernel_device()
    tokens, heads, kv_heads, max_pos = 7, 6, 2, 50
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], -1)
    pos = torch.randint(0, max_pos, (tokens,))
    q, k = torch.randn(tokens, heads, head_dim).to(dtype), torch.randn(tokens, kv_heads, head_dim).to(dtype)
    want_q, want_k = K.reference.rotary_embedding(pos, q.double(), k.double(), cache, is_neox)
    gq, gk = q.to(dev), k.to(dev)
    out_q, out_k = K.rotary_embedding(pos.to(dev), gq, gk, cache.float().to(dev), is_neox)
    assert out_q is gq and out_k is gk  # in place
    assert rel_err(gq.cpu(), want_q) <= TOL[dtype] and rel_err(gk.cpu(), want_k) <= TOL[dtype]
    if rot_dim < head_dim:  # dims past rot_dim untouched
        assert torch.equal(gq[..., rot_dim:].cpu(), q[..., rot_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 80, 1500])
def test_silu_and_mul(dtype, d):
    x = torch.randn(4, 3, 2 * d).to(dtype)
    got = K.silu_and_mul(x.to(kernel_device()))
    want = K.reference.silu_and_mul(x.double(), compute_dtype=torch.float64)
    assert got.shape == (4, 3, d) and rel_err(got.cpu(), want) <= TOL[dtype]


def test_the_dispatcher_names_its_path(monkeypatch):
    cpu = torch.empty(2)
    if torch.cuda.is_available():
        assert K.path_for(cpu.cuda()) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.path_for(cpu) == "triton-interpreter"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert K.path_for(cpu) == "reference"
    x = torch.randn(3, 8)
    assert torch.equal(K.silu_and_mul(x), K.reference.silu_and_mul(x))  # the reference path really runs


def test_bad_input_to_the_small_ops():
    with pytest.raises(ShapeError, match="weight"):
        K.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(ShapeError, match="residual"):
        K.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6, residual=torch.randn(2, 9))
    with pytest.raises(ShapeError, match="even"):
        K.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ShapeError, match="slot_mapping must be int32"):
        K.write_kv(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4),
                   torch.zeros(2))
    with pytest.raises(ShapeError, match="do not agree"):
        K.rotary_embedding(torch.zeros(3, dtype=torch.int64), torch.randn(3, 2, 8), torch.randn(3, 1, 8),
                           torch.randn(10, 10))
    with pytest.raises(ShapeError, match=r"q \(3, 2, 8\), k \(4, 1, 8\)"):  # k has a token too many
        K.rotary_embedding(torch.zeros(3, dtype=torch.int64), torch.randn(3, 2, 8), torch.randn(4, 1, 8),
                           torch.randn(10, 8))
    with pytest.raises(ShapeError, match=r"x must be an fp16, bf16 or fp32 tensor .*got \(2, 8\) torch.int64"):
        K.silu_and_mul(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ShapeError, match=r"different devices: x \(2, 8\) torch.float32 on cpu, weight \(8,\)"):
        K.rms_norm(torch.randn(2, 8), torch.randn(8, device="meta"), 1e-6)
    with pytest.raises(ShapeError, match=r"mismatched dtypes: key \(2, 1, 4\) torch.float16"):
        K.write_kv(torch.randn(2, 1, 4).half(), torch.randn(2, 1, 4), torch.randn(3, 2, 1, 4),
                   torch.randn(3, 2, 1, 4), torch.zeros(2, dtype=torch.int32))


def test_the_small_ops_take_a_forced_reference_path():
    x, w = torch.randn(4, 16, device=kernel_device()), torch.randn(16, device=kernel_device())
    assert torch.equal(K.silu_and_mul(x, path="reference"), K.reference.silu_and_mul(x))
    assert torch.equal(K.rms_norm(x, w, 1e-5, path="reference"), K.reference.rms_norm(x, w, 1e-5))
    triton_out = K.silu_and_mul(x, path="triton")
    assert rel_err(triton_out, K.reference.silu_and_mul(x.double(), compute_dtype=torch.float64)) <= 1e-5


def test_kernel_tests_run_the_triton_kernels():
    x = torch.randn(3, 8, device=kernel_device())
    assert K.path_for(x) in ("triton", "triton-interpreter")


def test_a_late_interpreter_switch_is_a_clear_error():
    """TRITON_INTERPRET set after Triton's library was defined cannot work; say so instead of Triton's
    'Cannot call @triton.jit'd outside of the scope of a kernel'."""
    import subprocess
    import sys

    code = ("import os, torch, triton.language, tidal.kernels as K; os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n    K.silu_and_mul(torch.randn(2, 4))\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("BackendError") and "before Python starts" in out, out
