"""Document rows (schema: decode_row, preemption_row) built from what a measurement returned."""
from __future__ import annotations

import statistics


def spread_fields(res: dict, batch: int, n: int) -> dict:
    """A decode row's repeats and the min and max of its time and tokens/s (`runs.decode_rounds`' result)."""
    lo, hi = res["min_decode_s"], res["max_decode_s"]
    steps = batch * (n - 1)
    return dict(repeats=res["rounds"], decode_seconds_min=lo, decode_seconds_max=hi,
                # a difference of two noisy times: the fastest round's may not be positive on a short decode
                tokens_per_second_min=steps / hi, tokens_per_second_max=steps / lo if lo > 0 else None)


def preemption_row(got: list[tuple], fraction: float, batch: int, context: int, pipelined: bool) -> dict:
    """One preemption row (schema: preemption_row) from recorded (PreemptionReport, ResumeReport) pairs:
    bytes from the first pair (every pair moves the same), each time the median over the pairs."""
    pre, res = got[0]

    def med(f):
        return statistics.median(f(p, r) for p, r in got)

    row = dict(system="tidal", weights=pre.weights, kv=pre.kv, pipelined=pipelined,
               resident_fraction=fraction, batch=batch, context=context, synthetic_context=True,
               weight_bytes=pre.weight_bytes,
               weight_out_seconds=med(lambda p, r: p.weight_seconds),
               weight_in_seconds=med(lambda p, r: r.weight_seconds), disk_bytes=res.disk_bytes,
               disk_seconds=med(lambda p, r: r.disk_seconds), kv_bytes=pre.kv_bytes,
               kv_out_seconds=med(lambda p, r: p.kv_seconds), kv_in_seconds=med(lambda p, r: r.kv_seconds),
               recompute_tokens=res.recompute_tokens, recompute_seconds=med(lambda p, r: r.recompute_seconds),
               preempt_seconds=med(lambda p, r: p.total_seconds),
               resume_seconds=med(lambda p, r: r.total_seconds),
               first_token_seconds=med(lambda p, r: r.time_to_first_token),
               total_seconds=med(lambda p, r: p.total_seconds + r.total_seconds), repeats=len(got))
    row["weight_seconds"] = row["weight_out_seconds"] + row["disk_seconds"] + row["weight_in_seconds"]
    row["kv_seconds"] = row["kv_out_seconds"] + row["kv_in_seconds"]
    return row
