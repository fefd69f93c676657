"""tidal.native.read_spans (the file loader) against Python's own seek + read, byte for byte.

Both O_DIRECT and buffered paths are exercised; a file system refusing O_DIRECT (the file systems here
accept it) and a disk failing reads are simulated with an LD_PRELOAD shim (tests/odirect_shim.c) in a
subprocess.
"""
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tidal import native
from tidal.errors import CheckpointError, ConfigError, ShapeError

SIZES = [0, 1, 4095, 4096, 4097, 300_001, 1 << 20]
OFFSETS = [0, 1, 4095, 4096, 4097, 12_345]
CHUNK = 64 << 10  # small chunks, so that a 1 MiB span is cut into many pieces


def _direct_supported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "blob.bin"
    data = random.Random(0).randbytes((3 << 20) + 777)
    path.write_bytes(data)
    return path, data


def _expected(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _spans_in(buffer: torch.Tensor, cases, rng: random.Random, congruent: bool):
    """Destinations carved from `buffer` at awkward addresses: file-congruent mod 4096, or shifted off it."""
    spans, cursor, base = [], 0, buffer.data_ptr()
    for offset, n in cases:
        cursor += 4096 + rng.randrange(4096)
        shift = 0 if congruent else rng.choice([1, 3, 64, 2049])
        cursor += (offset - (base + cursor) + shift) % 4096
        spans.append((offset, buffer[cursor:cursor + n]))
        cursor += n
    return spans


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("congruent", [True, False])
def test_awkward_spans_are_byte_exact(blob, threads, direct, congruent):
    path, data = blob
    rng = random.Random(threads * 10 + direct * 2 + congruent)
    cases = [(o, n) for o in OFFSETS for n in SIZES if o + n <= len(data)]
    cases += [(rng.randrange(len(data) - (2 << 20)), 2 << 20) for _ in range(3)]  # dozens of chunks each
    rng.shuffle(cases)
    buffer = torch.full((sum(n for _, n in cases) + 13_000 * len(cases),), 0xAB, dtype=torch.uint8)
    spans = _spans_in(buffer, cases, rng, congruent)
    info = native.read_spans([(path, o, d) for o, d in spans], threads=threads, direct=direct,
                             chunk_bytes=CHUNK)
    for (offset, dst), (_, n) in zip(spans, cases):
        assert bytes(dst.numpy()) == _expected(path, offset, n), (offset, n)
    assert info.bytes == sum(n for _, n in cases) and info.spans == len(cases) and info.files == 1
    assert info.direct_bytes + info.bounce_bytes + info.buffered_bytes == info.bytes
    if not native.available():
        assert info.path == "python (tidal._C absent)"
    elif direct and _direct_supported(path.parent):
        assert info.path.startswith("native (O_DIRECT")
        assert (info.direct_bytes if congruent else info.bounce_bytes) > info.bytes // 2, info
    else:
        assert info.path.startswith("native (buffered") and info.buffered_bytes == info.bytes


def test_many_tiny_tensors_and_typed_destinations(blob):
    path, data = blob
    rng = random.Random(7)
    spans, expected = [], []
    for _ in range(2000):
        n = rng.randrange(0, 40)
        offset = rng.randrange(len(data) - 4 * n - 1)
        dst = torch.empty(n, dtype=torch.float32)  # n float32 = 4n bytes
        spans.append((path, offset, dst))
        expected.append(data[offset:offset + 4 * n])
    native.read_spans(spans)
    for (_, _, dst), want in zip(spans, expected):
        assert bytes(dst.view(torch.uint8).numpy()) == want


def test_several_files_in_one_call(tmp_path, blob):
    path, data = blob
    other = tmp_path / "other.bin"
    other.write_bytes(data[::-1])
    a, b = torch.empty(500_000, dtype=torch.uint8), torch.empty(500_000, dtype=torch.uint8)
    info = native.read_spans([(other, 5, a), (path, 6, b)], threads=2, chunk_bytes=CHUNK)
    assert bytes(a.numpy()) == data[::-1][5:500_005] and bytes(b.numpy()) == data[6:500_006]
    assert info.files == 2


@pytest.mark.parametrize("with_native", [True, False])
def test_truncated_missing_and_odd_files_name_the_file(tmp_path, monkeypatch, with_native):
    if not with_native:
        monkeypatch.setattr(native, "_C", None)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"x" * 10_000)
    with pytest.raises(CheckpointError, match=f"{short}: truncated"):
        native.read_spans([(short, 4096, torch.empty(8192, dtype=torch.uint8))])
    with pytest.raises(CheckpointError, match=f"{short}: truncated"):
        native.read_spans([(short, 10_001, torch.empty(0, dtype=torch.uint8))])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for not_a_file in (tmp_path, fifo):  # a FIFO must raise, not wait for a writer
        with pytest.raises(CheckpointError, match=f"{not_a_file}: not a regular file"):
            native.read_spans([(not_a_file, 0, torch.empty(1, dtype=torch.uint8))])
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(CheckpointError, match=f"{missing}: cannot open: No such file"):
        native.read_spans([(missing, 0, torch.empty(1, dtype=torch.uint8))])


def test_python_fallback_gives_identical_bytes(blob, monkeypatch):
    path, data = blob
    rng = random.Random(3)
    cases = [(rng.randrange(len(data) - 70_000), rng.randrange(70_000)) for _ in range(50)]
    cases.append((1, len(data) - 1))
    outs = {}
    for mode in ("native", "python"):
        if mode == "python":
            monkeypatch.setattr(native, "_C", None)
        dsts = [torch.zeros(n, dtype=torch.uint8) for _, n in cases]
        info = native.read_spans([(path, o, d) for (o, _), d in zip(cases, dsts)])
        outs[mode] = [bytes(d.numpy()) for d in dsts]
    assert info.path == "python (tidal._C absent)" and info.buffered_bytes == info.bytes
    assert outs["python"] == outs["native"] == [data[o:o + n] for o, n in cases]


def test_bad_arguments_are_named(blob):
    path, _ = blob
    buf = torch.empty(100, dtype=torch.uint8)
    with pytest.raises(ShapeError, match="overlap"):
        native.read_spans([(path, 0, buf[:50]), (path, 0, buf[49:60])])
    with pytest.raises(ShapeError, match="span 1 destination must be a contiguous"):
        native.read_spans([(path, 0, buf[:4]), (path, 0, torch.empty(4, 4).t())])
    with pytest.raises(ConfigError, match="file offset -1"):
        native.read_spans([(path, -1, buf[:4])])
    with pytest.raises(ConfigError, match="threads"):
        native.read_spans([(path, 0, buf[:4])], threads=0)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        native.read_spans([(path, 0, buf[:4])], chunk_bytes=5000)


SHIM_RUN = """
import os, sys, torch
from tidal import native
from tidal.errors import CheckpointError
path, offset, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "rb") as f:
    f.seek(offset)
    want = f.read(n)
for refuse in ("open", "pread"):
    os.environ["TIDAL_SHIM_REFUSE"] = refuse  # the shim reads it at each call
    dst = torch.empty(n + 64, dtype=torch.uint8)[64:]
    info = native.read_spans([(path, offset, dst)], threads=2, chunk_bytes=64 << 10)
    assert bytes(dst.numpy()) == want
    print(f"{info.direct_bytes + info.bounce_bytes} {info.path}")
os.environ["TIDAL_SHIM_REFUSE"] = "eio"
try:
    native.read_spans([(path, offset, dst)], threads=3, chunk_bytes=64 << 10)
except CheckpointError as exc:
    print(exc)
"""


def test_refused_o_direct_falls_back_and_says_so_and_io_errors_raise(blob, tmp_path):
    if not native.available():
        pytest.skip("tidal._C absent: the Python path never uses O_DIRECT")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the O_DIRECT-refusing shim")
    shim = tmp_path / "shim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", shim, Path(__file__).with_name("odirect_shim.c"), "-ldl"],
                   check=True)
    path, data = blob
    out = subprocess.run([sys.executable, "-c", SHIM_RUN, str(path), "5", str(len(data) - 5)],
                         env=dict(os.environ, LD_PRELOAD=str(shim)), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    *refusals, failure = out.stdout.splitlines()
    assert re.fullmatch(f"{re.escape(str(path))}: (direct )?read of \\d+ bytes at offset \\d+ failed: "
                        "Input/output error", failure), failure
    for line, verb in zip(refusals, ["open(O_DIRECT)", "pread(O_DIRECT)"], strict=True):
        direct_bytes, name = line.split(" ", 1)
        assert direct_bytes == "0"  # nothing came through O_DIRECT, and the path says why
        assert name.startswith("native (buffered: O_DIRECT refused by the file system: "
                               f"{path}: {verb} failed: Invalid argument"), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_load_reads_every_tensor_in_batched_native_reads(tmp_path, monkeypatch, dtype):
    """Same dtype: the whole checkpoint in one batched read (every tensor a span); a conversion: one read per
    region, through that region's temporaries. Either way the bytes read are the file's tensor bytes and the
    report names the loader path."""
    from hf_models import make_model

    import tidal

    ref = make_model("llama", num_layers=3)
    ref.save_pretrained(tmp_path)
    ckpt_bytes = sum(p.numel() * p.element_size() for p in ref.state_dict().values())
    calls = []
    read_many = tidal.checkpoint.Checkpoint.read_many
    monkeypatch.setattr(tidal.checkpoint.Checkpoint, "read_many",
                        lambda self, items, **kw: calls.append(len(items)) or read_many(self, items, **kw))
    with tidal.Engine.from_pretrained(tmp_path, dtype=dtype, resident_fraction=1 / 3) as eng:
        load = eng.stats().load
        regions = len(eng.weights.device_keys) + len(eng.plan.streamed_layers)
    # one read for the device regions and one for the streamed layers' arena, or one per converted region
    assert len(calls) == (2 if dtype == torch.float32 else regions)
    tensors = len(ref.state_dict())
    assert load.bytes == ckpt_bytes and load.spans == tensors and load.seconds > 0
    assert load.path.startswith("native (" if native.available() else "python (")
    assert load.direct_bytes + load.bounce_bytes + load.buffered_bytes == load.bytes
