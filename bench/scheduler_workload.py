"""The workloads of bench/scheduler_bench.py (issue 14): models, budgets, SLOs, the arrival trace, one live
run of one policy, and its metrics. See that script's docstring.
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
import time

import numpy as np
import tidal
import torch
from tidal.errors import ConfigError
from tidal.presets import Preset, build
from tidal.simulate.metrics import Served, summarize

COMMON = {"model_type": "llama", "tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5}


def shape(name, hidden, layers, vocab, inter=None, heads=None):
    heads = heads or max(2, hidden // 32)
    return Preset(name, hidden_size=hidden, intermediate_size=inter or 3 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=vocab, **COMMON)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    preset: Preset
    slo_ttft_s: float
    slo_tpot_s: float


@dataclasses.dataclass(frozen=True)
class Workload:
    """3 models (Zipf rank = list order: the first is the most popular), a device budget as a fraction of the
    sum of their all-resident footprints, the Zipf exponent, prompt/output lengths (uniform, inclusive)."""

    name: str
    what: str
    models: tuple
    budget_of_sum: float
    zipf_s: float
    prompt_len: tuple = (4, 24)
    output_len: tuple = (8, 32)
    link: str = "a6000-pcie4"  # the emulated link unless --link says otherwise
    rate: float = 6.0  # arrivals per second unless --rate says otherwise
    # GB/s `link` was calibrated to on the machine the SLOs were set on (a 2-core Intel Xeon VM, 2026-12-02):
    # calibration scales the link with the machine's decode speed, so their ratio scales time
    # (--time-scale auto)
    reference_gbps: float | None = None

    def scaled(self, factor: float) -> "Workload":
        """The same workload with every model's SLOs multiplied by `factor` (the bench divides the rate by
        it)."""
        return dataclasses.replace(self, models=tuple(
            dataclasses.replace(m, slo_ttft_s=m.slo_ttft_s * factor, slo_tpot_s=m.slo_tpot_s * factor)
            for m in self.models))

    def describe(self) -> dict:
        return {"name": self.name, "what": self.what, "default_link": self.link, "default_rate_rps": self.rate,
                "budget_of_sum": self.budget_of_sum, "zipf_s": self.zipf_s,
                "prompt_len_uniform": list(self.prompt_len), "output_len_uniform": list(self.output_len),
                "models": [{"name": m.name, "hidden": m.preset.hidden_size, "layers": m.preset.num_hidden_layers,
                            "intermediate": m.preset.intermediate_size, "vocab": m.preset.vocab_size,
                            "params_M": round(m.preset.param_count() / 1e6, 2), "slo_ttft_s": m.slo_ttft_s,
                            "slo_tpot_s": m.slo_tpot_s} for m in self.models]}


def workloads(quick: bool) -> dict[str, Workload]:
    if quick:  # seconds on a CPU: tiny shapes, loose SLOs
        s = lambda n, h, l: shape(f"sb-quick-{n}", h, l, 256)
        ms = (Model("a", s("a", 64, 4), 2.0, 0.5), Model("b", s("b", 64, 3), 2.0, 0.5), Model("c", s("c", 64, 2), 2.0, 0.5))
        # the same three checkpoints and a fixed link in both, so that the cost policy's profiles are shared
        return {"copay": Workload("copay", "quick smoke", ms, 0.75, 0.6, (3, 8), (3, 8), link="0.02", rate=4.0),
                "nopay": Workload("nopay", "quick smoke", ms, 0.5, 1.2, (3, 8), (3, 8), link="0.02", rate=4.0)}
    big = lambda n, l: shape(f"sb-{n}", 256, l, 2048)  # the `tiny` preset's layer: 3.15 MB fp32
    copay = Workload(
        "copay", "co-residency should pay: three larger models of similar popularity (Zipf s=0.3) at 10 "
                 "requests/s, all three busy most of the time, a TTFT SLO (0.1 s) no longer than a reload of "
                 "the largest model (70 ms on the reference link) and a round, and a TPOT SLO a round of "
                 "three can meet; on a fast link (GH200's C2C, 8.9x) a few streamed layers cost a decode "
                 "step about 2x, a whole-model reload 8.9x the model's decode step plus its KV",
        (Model("L12", big("L12", 12), 0.1, 0.1), Model("L10", big("L10", 10), 0.1, 0.1),
         Model("L8", big("L8", 8), 0.1, 0.1)), 0.96, 0.3, link="gh200-c2c", rate=10.0, reference_gbps=0.6022)
    nopay = Workload(
        "nopay", "co-residency should not pay: a small, popular model (Zipf s=1.2, rank 1) whose decode "
                 "collapses when any of its layers streams behind the link, and two larger, rarer ones; the "
                 "budget holds the largest and the small one",
        (Model("S4", shape("sb-S4", 128, 4, 512), 0.3, 0.02), Model("L12", big("L12", 12), 1.0, 0.06),
         Model("L8", big("L8", 8), 1.0, 0.06)), 0.62, 1.2, reference_gbps=0.1803)
    return {"copay": copay, "nopay": nopay}


def engine_kwargs(quick: bool) -> dict:
    kv = 1 << 20 if quick else 1 << 22
    return {"dtype": torch.float32, "kv_cache_bytes": kv, "host_kv_bytes": kv, "block_size": 8, "kernels": "reference",
                "max_batch_size": 8, "prefetch_depth": 1}


def build_models(w: Workload, cache_dir=None) -> dict:
    return {m.name: build(m.preset, torch.float32, cache_dir=cache_dir, seed=i, log=lambda s: None)
            for i, m in enumerate(w.models)}


# A target the runtime does not list: NVIDIA GH200's HBM3 (4.0 TB/s, the 96 GB part) behind NVLink-C2C (900 GB/s
# both ways, 450 per direction, from the datasheet): a layer's copy 8.9x its decode, the lowest ratio of a
# shipping GPU and its host link. The runtime's TARGETS (PCIe) range from 23 (RTX 5000 Ada, Gen4) to 192.
EXTRA_TARGETS = {"gh200-c2c": ("GH200 (HBM3, 96 GB)", 4000.0, "NVLink-C2C", 450.0)}


def make_link(spec: str, path, kw: dict):
    """`spec` GB/s, or a target (tidal.backends.link.TARGETS or EXTRA_TARGETS) calibrated on the model at
    `path` (tidal.study.emulation.calibrate_link); "none": no emulation (None: copies at memory speed)."""
    if spec == "none":
        return None
    from tidal.backends import LinkEmulation

    try:
        return LinkEmulation(float(spec), f"{float(spec):g} GB/s")
    except ValueError:
        from tidal.backends.link import LinkTarget
        from tidal.study.emulation import calibrate_link
        target = LinkTarget(spec, *EXTRA_TARGETS[spec]) if spec in EXTRA_TARGETS else spec
        return calibrate_link(tidal.Engine.placement(path, device="cpu", **kw), target)


def arrivals(w: Workload, duration: float, rate: float, seed: int) -> list[dict]:
    """Poisson arrivals at `rate` per second for `duration` s; model by Zipf(s) over the list order; prompt
    tokens uniform over the model's vocabulary; lengths uniform. One numpy Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(w.models) + 1) ** w.zipf_s
    p /= p.sum()
    out, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration:
            return out
        m = w.models[rng.choice(len(w.models), p=p)]
        n = int(rng.integers(w.prompt_len[0], w.prompt_len[1] + 1))
        out.append({"t": round(t, 4), "model": m.name, "max_new_tokens": int(rng.integers(w.output_len[0], w.output_len[1] + 1)),
                    "prompt": rng.integers(0, m.preset.vocab_size, n).tolist()})


STATIC = "static"  # the bench's own reference policy, not tidal's: see StaticCoResidency


class StaticCoResidency:
    """A reference, not a tidal policy: every model loaded once at a fixed resident fraction chosen so that all
    three fit the budget together (`static_fractions`), never preempted; every active model with work steps
    at every tick. What pure co-residency with partial offload gives on a workload, with no switching."""

    def decide(self, snapshot) -> list:
        from tidal.policy import Load, ModelState
        from tidal.scheduler import Step
        loads = [Load(m.name) for m in snapshot.models if m.has_work and m.state is ModelState.UNLOADED]
        ready = {m.name for m in snapshot.models if m.state.active} | {a.model for a in loads}
        return loads + [Step(m.name) for m in snapshot.with_work if m.name in ready]


def static_fractions(w: Workload, paths: dict, kw: dict, budget: int) -> dict[str, float]:
    """The largest resident fraction f (in steps of 0.01), the same for every model, at which the three
    models' device footprints (`Engine.placement`) fit `budget` together."""
    for k in range(100, -1, -1):
        f = k / 100
        need = sum(tidal.Engine.placement(paths[m.name], device="cpu", resident_fraction=f, **kw).footprint.device
                   for m in w.models)
        if need <= budget:
            return {m.name: f for m in w.models}
    raise ConfigError("the models do not fit the budget together even with every layer streamed")


def policy_available(policy: str) -> str | None:
    """None when `tidal.scheduler` resolves `policy` (or it is the bench's STATIC), else why not."""
    if policy == STATIC:
        return None
    try:
        tidal.scheduler.resolve(policy)
        return None
    except ConfigError as exc:
        return f"not available: {exc}"


def run_policy(policy: str, w: Workload, paths: dict, kw: dict, link, budget: int, trace: list,
               drain_s: float, cost_models: dict | None = None, fractions: dict | None = None) -> dict:
    """One live run: the scheduler's loop in its thread (`sched.start()`), a feeder thread submitting each
    arrival at its timestamp, then up to `drain_s` for the rest to finish."""
    rt = tidal.Runtime(device="cpu", device_budget_bytes=budget)
    sched = tidal.Scheduler(rt, policy=StaticCoResidency() if policy == STATIC else policy)
    params = inspect.signature(sched.add_model).parameters
    for m in w.models:
        extra = {}
        if "slo_ttft_s" in params:  # the cost policy's inputs, where the scheduler takes them
            extra = {"slo_ttft_s": m.slo_ttft_s, "slo_tpot_s": m.slo_tpot_s}
            if cost_models and cost_models.get(m.name) is not None:
                extra["cost_model"] = cost_models[m.name]
        if fractions:
            extra["resident_fraction"] = fractions[m.name]
        sched.add_model(m.name, paths[m.name], link=link, **kw, **extra)
    reqs: list = []
    t0 = time.monotonic()

    def feed():
        for a in trace:
            delay = t0 + a["t"] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            reqs.append((a, sched.submit(a["model"], a["prompt"], max_new_tokens=a["max_new_tokens"])))

    error = None
    with rt:
        sched.start()
        feeder = threading.Thread(target=feed, name="feeder")
        feeder.start()
        feeder.join()
        deadline = time.monotonic() + drain_s
        for _, r in reqs:
            if not r._done.wait(max(0.0, deadline - time.monotonic())):
                break
        try:
            sched.stop()
        except Exception as exc:  # noqa: BLE001  # reported, not raised: the other policies still run
            error = repr(exc)
        stats = {name: e.stats() for name, e in rt.models.items()}
        result = metrics(w, reqs, sched.trace, stats, t0)
        result["trace_offset_s"] = round(t0 - getattr(sched, "_t0", t0), 4)  # trace time minus arrival time
        correction = getattr(sched.policy, "correction", None)  # the cost policy's learnt measured/predicted
        result["online_correction"] = correction.as_dict() if correction is not None else None
    result["error"] = error
    return result


def metrics(w: Workload, reqs, trace, stats, t0) -> dict:
    slos = {m.name: (m.slo_ttft_s, m.slo_tpot_s) for m in w.models}
    rows, served = [], []
    end = t0
    for a, r in reqs:
        n = len(r.output_ids)
        s = Served(a["model"], r.submitted_at, r.first_token_at, r.token_times[-1] if n else None, n,
                   r.done and r.error is None)
        served.append(s)
        end = max(end, r.finished_at or time.monotonic())
        rows.append({"model": a["model"], "arrival_s": a["t"], "ttft_s": s.ttft_s, "tpot_s": s.tpot_s, "tokens": n,
                     "done": r.done, "finish_reason": r.finish_reason, "slo_met": s.meets(*slos[a["model"]])})
    kinds = [e["action"] for e in trace]
    # each model is loaded once (no policy here unloads), so its engine's load bytes are all it read at load
    moved = {"preempt_weight": 0, "preempt_kv": 0, "resume_disk": 0, "resume_weight": 0, "resume_kv": 0,
             "residency": 0, "load": sum(s.load.bytes for s in stats.values())}
    for e in trace:  # the loop records each preemption's and resume's report with its action
        r = e.get("report")
        if e["action"] == "Preempt":
            moved["preempt_weight"] += r["weight_bytes"]
            moved["preempt_kv"] += r["kv_bytes"]
        elif e["action"] == "Resume":
            moved["resume_disk"] += r["disk_bytes"]
            moved["resume_weight"] += r["weight_bytes"]
            moved["resume_kv"] += r["kv_bytes"]
    moved["residency"] = sum(s.residency_to_device_bytes + s.residency_to_host_bytes for s in stats.values())
    moved["streamed"] = sum(s.bytes_streamed for s in stats.values())
    moved["total_switching"] = sum(v for k, v in moved.items() if k != "streamed")
    return {
        **summarize(served, slos, t0, end),
        "switches": {k: kinds.count(k) for k in ("Preempt", "Resume", "Load", "Unload")},
        "residency_changes": kinds.count("SetResidency"), "steps": kinds.count("Step"),
        "bytes_moved": moved,
        "trace": [{k: e.get(k) for k in ("time", "action", "model", "args", "predicted_s", "measured_s", "why")}
                  for e in trace if e["action"] != "Step"],
        "step_times": {m.name: [round(e["time"], 4) for e in trace if e["action"] == "Step" and e["model"] == m.name]
                       for m in w.models},
        "requests_detail": rows,
    }
