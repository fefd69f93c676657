"""Builds the server's `Service` from a `ServeConfig`: the Runtime under the budgets, the Scheduler with the
policy, every model registered (a preset name is built or found in tidal's cache) with its tokenizer."""
from __future__ import annotations

import logging
import time

from .config import ModelConfig, ServeConfig
from .service import ServedModel, Service

log = logging.getLogger("tidal.serve")
TRACE_KEEP = 100_000  # scheduler trace entries a server keeps in memory (each step is one; metrics read them as they come)


def build_service(config: ServeConfig, metrics=None, register: bool = True) -> Service:
    """A Service over a new Runtime (the config's device and budgets) and Scheduler (its policy), with every
    model of `config` registered (`register_model`; nothing is loaded yet: the policy loads a model when it
    has work, or `Service.start(warmup=True)` does) unless `register` is False (a Ray replica registers the
    models it is given, as it is given them); `metrics`: a `metrics.ServeMetrics` (default: a new one). Logs
    what goes where. A tidal error names what is wrong; nothing stays allocated then."""
    from .. import Runtime, Scheduler

    rt = Runtime(device=config.device, device_budget_bytes=config.device_budget,
                 host_budget_bytes=config.host_budget)
    sched = Scheduler(rt, policy=config.policy, trace_keep=TRACE_KEEP)
    if metrics is None:
        from .metrics import ServeMetrics

        metrics = ServeMetrics()
    service = Service(sched, {}, metrics=metrics, shutdown_grace_s=config.shutdown_grace_s)
    try:
        for mc in config.models if register else ():
            register_model(service, mc)
    except BaseException:
        sched.close()
        rt.close()
        raise
    log.info("tidal serve: policy %r, device %s, device budget %s, host budget %s", sched.policy, rt.device,
             _size(config.device_budget), _size(config.host_budget))
    return service


def register_model(service: Service, mc: ModelConfig) -> ServedModel:
    """Register the model `mc` on the service's scheduler (a preset name is built or found in tidal's cache)
    with its tokenizer, and offer it; ConfigError naming what is wrong, and nothing registered then."""
    from .. import Engine, presets
    from ..text import Tokenizer

    sched = service.scheduler
    rt = sched.runtime
    kwargs = mc.engine_kwargs()
    resolve_kwargs = {"dtype": kwargs["dtype"]} if "dtype" in kwargs else {}
    path = presets.resolve(mc.path, log=log.info, **resolve_kwargs)
    tokenizer = Tokenizer.from_checkpoint(path)  # ConfigError naming the path when it has none
    p = Engine.placement(path, device=rt.device, **kwargs)
    sched.add_model(mc.name, path, slo_ttft_s=mc.slo_ttft_s, slo_tpot_s=mc.slo_tpot_s, cost_model=mc.profile,
                    **kwargs)
    capacity = p.kv.num_device_blocks * p.engine.block_size
    served = ServedModel(mc.name, str(path), tokenizer, p.model.max_position_embeddings, capacity, int(time.time()))
    service.models[mc.name] = served
    fp = p.footprint
    log.info("tidal serve: model %s = %s (%s, %s on %s): %.1f MiB device, %.1f MiB host while "
             "active; %d positions, KV cache %d tokens; EOS ids %s", mc.name, path,
             p.model.model_type, str(p.dtype).removeprefix("torch."), rt.device, fp.device / 2**20,
             fp.host / 2**20, p.model.max_position_embeddings, capacity, list(tokenizer.eos_token_ids))
    return served


def _size(n: int | None) -> str:
    return "none" if n is None else f"{n / 2**30:.2f} GiB"
