"""Every Triton kernel in tidal.kernels compiled for sm_80 and sm_90 ahead of time, on this machine, with no
GPU (Triton's wheel ships ptxas). Catches what the interpreter lets through: tl.dot dimensions below 16,
shared memory past the architecture's limit, fp16/bf16 products that miss the tensor cores, fp32 products
that silently take tf32.

The launches come from the same functions the ops run (`attention.launches`, `elementwise.*_launch`), built
on meta tensors. Compiling needs TRITON_INTERPRET unset, which conftest sets for the other kernel tests, so
the compiles run in two worker processes without it (`_worker` below). Triton's on-disk cache keeps reruns
fast and recompiles whatever changed; TRITON_CACHE_DIR=<empty dir> measures a cold run.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tidal.errors import BackendError

ARCHS = (80, 90)
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 80, 96, 128, 256, 8)  # 8: below tl.dot's smallest K, padded by the kernel
BLOCKS = (8, 16, 32)
GROUPS = (1, 3, 8)
# Shared memory one block may opt into, in bytes (CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability")
SHARED_LIMIT = {80: 166912, 90: 232448}
MMA = re.compile(r"^\s*(?:wgmma|mma)\.", re.MULTILINE)  # tensor-core instructions in PTX
WORKERS = 2


def _head_dims(arch_index, dtype):
    """fp16/bf16: every head dim on each arch. fp32: every head dim on one arch or the other, 256 (the largest
    kernel) on both: its products are FMA code that the arch barely changes, and it compiles slowest (40% of
    the time of the full sweep), which would push the test past a minute on two shared cores."""
    if dtype != "float32":
        return HEAD_DIMS
    return tuple(d for i, d in enumerate(HEAD_DIMS) if (i + arch_index) % 2 == 0 or d == 256)


def attention_cases():
    """The head dims of `_head_dims` per (arch, dtype); the block size, group and split cycle with them, so
    that every (arch, dtype) sees each block size, each group and both split modes. Plus block sizes past the
    tile (128) and not a power of two (24), which the engine accepts."""
    cases = []
    for a, arch in enumerate(ARCHS):
        for t, dtype in enumerate(DTYPES):
            for i, head_dim in enumerate(_head_dims(a, dtype)):
                cases.append(dict(op="attention", arch=arch, dtype=dtype, head_dim=head_dim,
                                  block_size=BLOCKS[(i + a) % 3], group=GROUPS[(i + t) % 3],
                                  splits=(1, 4)[(i + t + a) % 2]))
    cases.append(dict(op="attention", arch=90, dtype="float16", head_dim=128, block_size=24, group=4,
                      splits=1))
    cases.append(dict(op="attention", arch=80, dtype="bfloat16", head_dim=128, block_size=128, group=8,
                      splits=4))
    return cases


def small_op_cases():
    """Each small op once per (arch, dtype), at a large model's sizes; the residual and rotary-style variants
    alternate with the dtype, so each arch compiles both."""
    cases = []
    for arch in ARCHS:
        for t, dtype in enumerate(DTYPES):
            common = dict(arch=arch, dtype=dtype)
            cases += [dict(op="write_kv", num_kv_heads=8, head_dim=128, **common),
                      dict(op="rms_norm", hidden=8192, residual=t % 2 == 0, **common),
                      dict(op="rotary", num_heads=32, head_dim=128, is_neox=t % 2 == 1, **common),
                      dict(op="silu_and_mul", d=14336, **common)]
    return cases


CASES = attention_cases() + small_op_cases()


def case_id(case):
    return "-".join(f"{v}" if k in ("op", "dtype") else f"{k}{v}" for k, v in case.items())


def _specs(case):
    from tidal.kernels import attention, elementwise

    dtype = getattr(torch, case["dtype"])

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    op = case["op"]
    if op == "attention":
        kv_heads, d = 2, case["head_dim"]
        q = empty(4, kv_heads * case["group"], d)
        cache = empty(256, case["block_size"], kv_heads, d)
        return attention.launches(q, cache, cache, empty(4, 64, dt=torch.int32), empty(4, dt=torch.int32),
                                  d ** -0.5, torch.empty_like(q), case["splits"], interpreted=False)
    if op == "write_kv":
        new = empty(64, case["num_kv_heads"], case["head_dim"])
        cache = empty(256, 16, case["num_kv_heads"], case["head_dim"])
        return [elementwise.write_kv_launch(new, new, cache, cache, empty(64, dt=torch.int32))]
    if op == "rms_norm":
        x = empty(64, case["hidden"])
        res = x if case["residual"] else None
        return [elementwise.rms_norm_launch(x, empty(case["hidden"]), 1e-6, res, torch.empty_like(x), res)]
    if op == "rotary":
        x = empty(64, case["num_heads"], case["head_dim"])
        return [elementwise.rotary_launch(empty(64, dt=torch.int64), x, empty(4096, case["head_dim"],
                                                                              dt=torch.float32),
                                          case["is_neox"])]
    x = empty(64, 2 * case["d"])
    return [elementwise.silu_and_mul_launch(x, empty(64, case["d"]))]


def _qualname(fn):
    return f"{fn.__module__}.{fn.__name__}"


def _entry_kernels():
    """Every @triton.jit function in tidal.kernels that no other one calls: the kernels a launch names."""
    import importlib
    import inspect
    import pkgutil

    import tidal.kernels
    from triton.runtime.jit import JITFunction

    fns = []
    for info in pkgutil.iter_modules(tidal.kernels.__path__):
        module = importlib.import_module(f"tidal.kernels.{info.name}")
        fns += [v for v in vars(module).values()
                if isinstance(v, JITFunction) and v.__module__ == module.__name__]
    sources = {_qualname(f): inspect.getsource(f.fn) for f in fns}
    called = {_qualname(f) for f in fns
              if any(re.search(rf"\b{f.__name__}\(", src)
                     for name, src in sources.items() if name != _qualname(f))}
    return sorted(set(sources) - called)


def _worker():
    """Reads cases as JSON on stdin, compiles their launches, writes one result per case as JSON on stdout."""
    from tidal.kernels.aot import compile_launch

    results = []
    for case in json.load(sys.stdin):
        compiled = []
        try:
            for spec in _specs(case):
                start = time.perf_counter()
                kernel = compile_launch(spec, case["arch"])
                ptx = kernel.asm["ptx"]
                compiled.append(dict(kernel=_qualname(spec.kernel), shared=kernel.metadata.shared,
                                     mma=bool(MMA.search(ptx)), tf32="tf32" in ptx,
                                     cubin=len(kernel.asm["cubin"]),
                                     seconds=time.perf_counter() - start))
            results.append(dict(compiled=compiled))
        except Exception as e:  # reported per case, so that one failure does not hide the others
            cause = f"\ncaused by {e.__cause__!r}" if e.__cause__ else ""  # Triton's reason, e.g. a dot's shape
            results.append(dict(compiled=compiled, error=f"{type(e).__name__}: {e}{cause}"))
    json.dump(dict(results=results, entry_kernels=_entry_kernels()), sys.stdout)


def _shares():
    """Case indices per worker, the longest first to the least loaded, so that the workers finish together.
    Measured: stage 1 of fp32 attention compiles in about 1.2 s, of fp16/bf16 in 0.6 s, the rest in 0.1 s."""
    def cost(case):
        return 0.1 if case["op"] != "attention" else 1.2 if case["dtype"] == "float32" else 0.6

    shares, loads = [[] for _ in range(WORKERS)], [0.0] * WORKERS
    for i in sorted(range(len(CASES)), key=lambda i: -cost(CASES[i])):
        w = loads.index(min(loads))
        shares[w].append(i)
        loads[w] += cost(CASES[i])
    return shares


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import test_kernels_compile as t; t._worker()")
    start = time.perf_counter()
    shares = _shares()
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in shares]
    try:
        outputs = [p.communicate(json.dumps([CASES[i] for i in share]), timeout=600)
                   for p, share in zip(procs, shares)]
    finally:
        for p in procs:  # no-ops once a worker has exited; ends the others on a timeout
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    parsed = [json.loads(out) for out, _ in outputs]
    results = [None] * len(CASES)
    for share, got in zip(shares, parsed):
        for i, result in zip(share, got["results"]):
            results[i] = result
    print(f"compiled {len(CASES)} cases in {time.perf_counter() - start:.1f} s with {WORKERS} workers")
    return dict(zip(map(case_id, CASES), results)), parsed[0]["entry_kernels"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_compiles_for_the_gpu(case, compiled):
    result = compiled[0][case_id(case)]
    assert "error" not in result, result.get("error")
    for k in result["compiled"]:
        assert k["cubin"] > 0, k
        assert k["shared"] <= SHARED_LIMIT[case["arch"]], k
    if case["op"] != "attention":
        return
    names = [k["kernel"].rsplit(".", 1)[1] for k in result["compiled"]]
    assert names == (["_decode_stage1"] if case["splits"] == 1 else ["_decode_stage1", "_decode_merge"])
    stage1 = result["compiled"][0]
    if case["dtype"] == "float32":  # ieee products: neither tf32 nor any tensor-core instruction
        assert not stage1["mma"] and not stage1["tf32"], stage1
    else:
        assert stage1["mma"], stage1


def test_every_kernel_is_compiled(compiled):
    results, entry_kernels = compiled
    assert {"tidal.kernels.attention._decode_stage1", "tidal.kernels.attention._decode_merge",
            "tidal.kernels.elementwise._rms_norm"} <= set(entry_kernels)
    assert "tidal.kernels.attention._dot" not in entry_kernels  # a device function, compiled inside stage 1
    covered = {k["kernel"] for r in results.values() for k in r["compiled"]}
    assert covered == set(entry_kernels)


def test_the_attention_cases_cover_the_engine_shapes():
    attention = [c for c in CASES if c["op"] == "attention"]
    for dtype in DTYPES:
        assert {c["head_dim"] for c in attention if c["dtype"] == dtype} >= set(HEAD_DIMS)
    for arch in ARCHS:
        for dtype in DTYPES:
            mine = [c for c in attention if (c["arch"], c["dtype"]) == (arch, dtype)]
            if dtype != "float32":
                assert {c["head_dim"] for c in mine} >= set(HEAD_DIMS)
            assert {c["block_size"] for c in mine} >= set(BLOCKS)
            assert {c["group"] for c in mine} >= set(GROUPS)
            assert {c["splits"] for c in mine} == {1, 4}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only the interpreter refuses")
def test_compiling_under_the_interpreter_is_a_clear_error():
    from tidal.kernels import aot, elementwise

    x = torch.empty(2, 8)
    with pytest.raises(BackendError, match="without TRITON_INTERPRET=1"):
        aot.compile_launch(elementwise.silu_and_mul_launch(x, torch.empty(2, 4)), 90)
