
import pytest
import torch
from safetensors.torch import load_file

from hf_models import make_model
from tidal.checkpoint import Checkpoint
from tidal.errors import CheckpointError


@pytest.fixture(scope="module", params=["single", "sharded"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_model("qwen2", dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200KB" if request.param == "sharded" else "10GB")
    return path


def _reference(path):
    ref = {}
    for f in sorted(path.glob("*.safetensors")):
        ref.update(load_file(f))
    return ref


def test_reads_every_tensor_exactly(saved):
    ckpt = Checkpoint(saved)
    ref = _reference(saved)
    assert set(ckpt.tensors) == set(ref) and len(ref) > 10
    if "sharded" in saved.name:
        assert len({i.file for i in ckpt.tensors.values()}) > 1
    for name, want in ref.items():
        got = ckpt.load(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        out = torch.empty(want.numel() * want.element_size(), dtype=torch.uint8)  # any byte view works
        assert torch.equal(ckpt.read_into(name, out).view(want.dtype).view(want.shape), want)
    assert ckpt.config["model_type"] == "qwen2"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_shard_names_the_file(saved, tmp_path):
    if "single" in saved.name:
        pytest.skip("sharded only")
    path = _copy(saved, tmp_path / "c")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard missing"):
        Checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "garbage-header", "bad-length",
                                    "no-config", "bad-config"])
def test_damaged_checkpoints_raise_checkpoint_error(saved, tmp_path, damage):
    path = _copy(saved, tmp_path / "c")
    f = sorted(path.glob("*.safetensors"))[0]
    data = f.read_bytes()
    if damage == "truncate-data":
        f.write_bytes(data[:-7])
        match = "truncated: tensor"
    elif damage == "truncate-header":
        f.write_bytes(data[:5])
        match = "truncated before its header"
    elif damage == "garbage-header":
        n = int.from_bytes(data[:8], "little")
        f.write_bytes(data[:8] + b"{" * n + data[8 + n:])
        match = "corrupted header"
    elif damage == "bad-length":
        f.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
        match = "corrupted header length"
    elif damage == "no-config":
        (path / "config.json").unlink()
        f, match = path / "config.json", "missing"
    else:
        (path / "config.json").write_text("{not json")
        f, match = path / "config.json", "not valid JSON"
    with pytest.raises(CheckpointError, match=match) as exc:
        Checkpoint(path)
    assert str(f) in str(exc.value)


def test_unknown_tensor_and_wrong_shape(saved):
    ckpt = Checkpoint(saved)
    with pytest.raises(CheckpointError, match="no.such not in the checkpoint"):
        ckpt.load("no.such")
    name = "model.embed_tokens.weight"
    with pytest.raises(CheckpointError, match=f"{name} has shape"):
        ckpt.load(name, shape=(1, 2))
    with pytest.raises(CheckpointError, match="destination"):
        ckpt.read_into(name, torch.empty(3))


@pytest.mark.parametrize("with_native", [True, False])
def test_read_many_fills_every_tensor_in_one_call(saved, monkeypatch, with_native):
    from tidal import native

    if not with_native:
        monkeypatch.setattr(native, "_C", None)
    ckpt = Checkpoint(saved)
    ref = _reference(saved)
    names = sorted(ref)
    arena = torch.zeros(sum(ckpt.info(n).nbytes + 67 for n in names), dtype=torch.uint8)
    items, cursor = [], 0
    for name in names:  # byte destinations at odd addresses, as arena regions can be
        cursor += 67
        items.append((name, arena[cursor:cursor + ckpt.info(name).nbytes]))
        cursor += ckpt.info(name).nbytes
    info = ckpt.read_many(items)
    for name, out in items:
        assert torch.equal(out, ref[name].reshape(-1).view(torch.uint8)), name
    assert info.bytes == sum(out.numel() for _, out in items) and info.spans == len(names)
    assert info.files == len({ckpt.info(n).file for n in names}) and info.gbps > 0
    assert info.path.startswith("native (") if with_native and native.available() else \
        info.path == "python (tidal._C absent)"


def test_read_many_checks_each_destination(saved):
    ckpt = Checkpoint(saved)
    name = "model.norm.weight"
    good = torch.empty(ckpt.info(name).shape, dtype=ckpt.info(name).dtype)
    with pytest.raises(CheckpointError, match=f"{name} has .* bytes; destination is \\(3,\\)"):
        ckpt.read_many([(name, good), (name, torch.empty(3))])
    with pytest.raises(CheckpointError, match="destination is list"):
        ckpt.read_many([(name, [1, 2])])
    with pytest.raises(CheckpointError, match="no.such not in the checkpoint"):
        ckpt.read_many([("no.such", good)])
    with pytest.raises(CheckpointError, match="overlap"):
        ckpt.read_many([(name, good), (name, good)])
    assert ckpt.read_many([]).bytes == 0
