"""gpu_check section "kernels".

1. Correctness of every compiled kernel against a float64 reference (a few shapes per dtype, split and
   unsplit): the suite checks these kernels through Triton's interpreter, and this is where the compiled
   code (native fp16/bf16 tensor-core products included) is checked.
2. paged_decode_attention at batch 1/16/64 x context 512/4096/32768 with Llama-3-8B heads (32 query, 8 kv,
   head_dim 128), bf16, block 16, timed with CUDA events (median of many runs, rotating among copies of the
   cache that together exceed L2). Beside it: torch's scaled_dot_product_attention on the same K/V gathered
   into contiguous tensors (the gather is not timed, and SDPA rotates among as many copies), and the
   device-to-device copy bandwidth of the same run. Target at batch x context >= 16 x 4096: >= 70% of the
   copy bandwidth and faster than SDPA.
With --device cpu it is a smoke run (tiny shapes, wall-clock timing) so that the script cannot rot unseen.
"""
import math
import statistics
import time

import torch

import gpu_plan
import tidal.kernels as K
from gpu_report import KERNEL_COPY as TARGET, KERNEL_MIN_WORK
from tidal.tables import format_table

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
ROTATE_BYTES = 512 << 20  # well over any L2 (50-60 MB on H100/H200)
RUNS = 50
VERDICT = {None: "", True: "met", False: "MISSED"}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _time(fn_for, copies: int, runs: int, device: str) -> float:
    """Median seconds of fn_for(i % copies)() over `runs`, each bracketed by CUDA events (CPU: wall clock)."""
    for i in range(min(copies, 3)):
        fn_for(i)()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for i in range(runs):
        fn = fn_for(i % copies)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device-to-device copy GB/s, counting bytes read and written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / _time(lambda i: (lambda: b.copy_(a)), 1, 20, device) / 1e9


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _paged(batch, context, heads, kv_heads, head_dim, block, dtype, device, copies=1):
    blocks = math.ceil(context / block)
    caches = []
    for _ in range(copies):
        k = torch.randn(batch * blocks, block, kv_heads, head_dim, dtype=dtype, device=device)
        caches.append((k, torch.randn_like(k)))
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
    return q, caches, tables, lens


def correctness(device: str, small: bool = False) -> list:
    """[name, relative error, tolerance, ok] for each kernel (compiled, on a GPU) on a few shapes."""
    rows = []
    shapes = [(torch.float32, 80, 8, 12, 4), (torch.float16, 128, 16, 32, 8),
              (torch.bfloat16, 128, 16, 32, 8), (torch.bfloat16, 256, 32, 8, 1)]
    for dtype, head_dim, block, heads, kv_heads in shapes[2:3] if small else shapes:
        q, ((k, v),), tables, _ = _paged(3, 300, heads, kv_heads, head_dim, block, dtype, device)
        lens = torch.tensor([300, 1, block + 1], dtype=torch.int32, device=device)
        ref = K.reference.paged_decode_attention(q.double(), k.double(), v.double(), tables, lens,
                                                 head_dim ** -0.5, compute_dtype=torch.float64)
        for splits in (1, 4):
            got = K.paged_decode_attention(q, k, v, tables, lens, num_splits=splits)
            err = _rel(got, ref)
            name = f"paged_decode {str(dtype)[6:]} d{head_dim} b{block} {heads}/{kv_heads} s{splits}"
            rows.append([name, err, TOL[dtype], err <= TOL[dtype]])
    x = torch.randn(64, 4096, device=device, dtype=torch.bfloat16)
    w, r = torch.randn(4096, device=device, dtype=torch.bfloat16), torch.randn_like(x)
    got, res = K.rms_norm(x, w, 1e-6, r)
    want, want_res = K.reference.rms_norm(x.double(), w.double(), 1e-6, r.double(), torch.float64)
    rows.append(["rms_norm+residual bf16", max(_rel(got, want), _rel(res, want_res)), TOL[torch.bfloat16]])
    y = torch.randn(64, 2 * 1000, device=device, dtype=torch.bfloat16)
    want = K.reference.silu_and_mul(y.double(), torch.float64)
    rows.append(["silu_and_mul bf16", _rel(K.silu_and_mul(y), want), TOL[torch.bfloat16]])
    pos = torch.randint(0, 100, (16,), device=device)
    cache = torch.randn(100, 128, device=device)
    qr = torch.randn(16, 32, 128, device=device, dtype=torch.bfloat16)
    kr = torch.randn(16, 8, 128, device=device, dtype=torch.bfloat16)
    want_q, want_k = K.reference.rotary_embedding(pos, qr.double(), kr.double(), cache.double())
    K.rotary_embedding(pos, qr, kr, cache)
    rows.append(["rotary bf16", max(_rel(qr, want_q), _rel(kr, want_k)), TOL[torch.bfloat16]])
    kc = torch.full((8, 16, 8, 128), float("nan"), device=device, dtype=torch.bfloat16)
    vc, key = torch.full_like(kc, float("nan")), torch.randn(20, 8, 128, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(8 * 16, device=device)[:20].to(torch.int32)
    K.write_kv(key, -key, kc, vc, slots)
    untouched = torch.ones(8 * 16, dtype=torch.bool, device=device)
    untouched[slots.long()] = False
    flat_k, flat_v = kc.view(-1, 8, 128), vc.view(-1, 8, 128)
    exact = (torch.equal(flat_k[slots.long()], key) and torch.equal(flat_v[slots.long()], -key)
             and bool(torch.isnan(flat_k[untouched]).all()))
    rows.append(["write_kv bf16 (exact)", 0.0 if exact else float("inf"), 0.0])
    return [r if len(r) == 4 else r + [r[1] <= r[2]] for r in rows]


def _sdpa(q, k, v, tables, context):
    """SDPA over K/V gathered into [B, Hkv, context, D], as a call; the gather is done here."""
    batch = q.shape[0]
    kc = k[tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
    vc = v[tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
    qs = q[:, :, None, :]
    try:
        torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)
        return lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)
    except TypeError:  # torch < 2.5 has no enable_gqa: repeat K/V heads (untimed)
        group = HEADS // KV_HEADS
        kr, vr = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)
        return lambda: torch.nn.functional.scaled_dot_product_attention(qs, kr, vr)


def _bench_case(batch, context, copy_gbps, num_sms, device, runs) -> tuple:
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
    q, caches, tables, lens = _paged(batch, context, HEADS, KV_HEADS, HEAD_DIM, BLOCK, torch.bfloat16, device,
                                     copies)
    out = torch.empty_like(q)
    splits = K.choose_num_splits(batch, KV_HEADS, tables.shape[1], num_sms)
    t_tidal = _time(lambda i: (lambda: K.paged_decode_attention(q, *caches[i], tables, lens, out=out,
                                                               check_lens=False)), copies, runs, device)
    ref = K.reference.paged_decode_attention(q, *caches[(runs - 1) % copies], tables, lens, HEAD_DIM ** -0.5)
    err = _rel(out, ref)
    fits = kv_bytes * copies * 2 < (24 << 30)  # the gathered copies beside the paged ones
    sdpa = [_sdpa(q, k, v, tables, context) for k, v in caches] if fits else None
    t_sdpa = _time(lambda i: sdpa[i], copies, runs, device) if sdpa else float("nan")
    gbps = (kv_bytes + 2 * q.numel() * 2) / t_tidal / 1e9
    r = dict(batch=batch, context=context, splits=splits, copies=copies, tidal_us=t_tidal * 1e6,
             sdpa_us=t_sdpa * 1e6, tidal_gbps=gbps, of_copy=gbps / copy_gbps, rel_err=err,
             target_applies=batch * context >= KERNEL_MIN_WORK)
    r["target_met"] = (r["of_copy"] >= TARGET and t_tidal < t_sdpa) if r["target_applies"] else None
    row = [batch, context, splits, r["tidal_us"], r["sdpa_us"], gbps, f"{r['of_copy']:.0%}",
           f"{t_sdpa / t_tidal:.2f}x", f"{err:.1e}", VERDICT[r["target_met"]]]
    return r, row


def run(ctx) -> dict:
    device = ctx.device
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        return {"table": "skipped: no CUDA device", "skipped": True}
    path = K.path_for(torch.empty(0, device=device))
    checks = correctness(device, small=not gpu)
    ctx.log(f"kernel correctness on path {path}: {sum(c[3] for c in checks)}/{len(checks)} within tolerance")
    copy_gbps = copy_bandwidth(device, (1 << 30) if gpu else (64 << 20))
    ctx.log(f"device copy: {copy_gbps:.0f} GB/s (read + write)")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if gpu else K.INTERPRETER_SMS
    rows, results, stopped = [], [], None
    partial = dict(path=path, correctness=checks, copy_gbps=copy_gbps, num_sms=num_sms, rows=results)
    ctx.progress(partial)
    for batch, context in gpu_plan.grid(gpu_plan.KERNEL_CASES, ctx.quick):
        est = gpu_plan.kernel_case_s(batch, context, ctx.rates)
        # the first case runs whatever time is left (its process is still stopped at its share's end): a
        # section without a row measures nothing (a cold clone's interpreter once used the share up before it)
        if results and not ctx.fits(est):
            stopped = (f"not run for time: batch {batch} x context {context} and after (needs ~{est:.0f} s, "
                       f"{ctx.seconds_left():.0f} s left)")
            ctx.log(stopped)
            break
        r, row = _bench_case(batch, context, copy_gbps, num_sms, device, RUNS if gpu else 2)
        results.append(r)
        rows.append(row)
        ctx.progress(partial)
        if gpu:
            torch.cuda.empty_cache()
    table = (f"path {path}\n" + format_table(["kernel check", "rel err", "tol", "ok"], checks) +
             f"\n\ndevice copy bandwidth (read + write): {copy_gbps:.0f} GB/s; {num_sms} SMs\n" +
             format_table(["batch", "context", "splits", "tidal us", "sdpa us", "tidal GB/s", "of copy",
                           "sdpa/tidal", "rel err", "target"], rows) + (f"\n{stopped}" if stopped else ""))
    return {"path": path, "correctness": checks, "copy_gbps": copy_gbps, "num_sms": num_sms, "rows": results,
            "stopped_early": stopped, "table": table}
