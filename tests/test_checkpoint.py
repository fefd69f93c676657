
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
