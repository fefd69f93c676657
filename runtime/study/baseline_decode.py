"""A baseline's decode rows: accelerate offloading exactly the layers tidal's engine streams at each resident
fraction, or plain transformers all resident, timed as tidal's rows are (`runs.decode_rounds`)."""
from __future__ import annotations

import statistics
from typing import Callable, Iterator

from ..errors import ConfigError
from . import runs
from .hf import free, quiet_loads, require_hf, resolve
from .progress import Progress
from .rows import spread_fields

BASELINES = ("accelerate", "transformers")


def check_baseline(baseline) -> str:
    """`baseline`, or ConfigError naming the baselines."""
    if baseline not in BASELINES:
        raise ConfigError(f"baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    return baseline


def streamed_layers(path, fraction: float, device, dtype, prefetch_depth: int = 2) -> tuple[int, ...]:
    """The decoder layers tidal's engine streams at resident `fraction`: its own plan (`Engine.placement`)."""
    from ..engine import Engine

    return Engine.placement(path, device=device, dtype=dtype, resident_fraction=fraction,
                            prefetch_depth=prefetch_depth).plan.streamed_layers


def load_baseline(path, baseline: str, fraction: float, device, dtype, prefetch_depth: int = 2):
    """transformers' model of checkpoint `path` in `dtype`, as `baseline` serves it at resident `fraction`:
    accelerate offloading the layers tidal streams at that fraction, or plain transformers on `device`
    (fraction 1.0 only). Returns (model, number of decoder layers on the device)."""
    from transformers import AutoModelForCausalLM

    from ..baselines import accelerate_offload
    from ..offload import find_decoder_layers

    if check_baseline(baseline) == "transformers" and fraction != 1.0:
        raise ConfigError(f"plain transformers keeps every layer resident; resident fraction {fraction:g} "
                          f"needs --baseline accelerate")
    device, dtype = resolve(device, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    layers = len(find_decoder_layers(model))
    if baseline == "transformers":
        return model.to(device), layers
    streamed = streamed_layers(path, fraction, device, dtype, prefetch_depth)
    return accelerate_offload(model, streamed, device), layers - len(streamed)


def decode_row(gen, system: str, fraction: float, resident_layers: int, batch: int, prompt_tokens: int,
               n: int, rounds: dict, vocab: int) -> dict:
    """One baseline decode row (schema: decode_row), timed as tidal's `profile.decode_row` times its own:
    `runs.decode_rounds` with the same round arguments (`rounds`) on the same prompts."""
    prompts = runs.same_length_prompts(batch, prompt_tokens, vocab)
    res = runs.decode_rounds({system: gen}, prompts, n, warmup_tokens=n, **rounds)[system]  # as tidal's rows
    return dict(system=system, resident_fraction=fraction, resident_layers=resident_layers, batch=batch,
                prompt_tokens=prompt_tokens, output_tokens=n,
                decode_seconds=statistics.median(res["decode_s"]), tokens_per_second=res["tok_s"],
                step_seconds=res["step_s"], mean_context=prompt_tokens + n / 2, **spread_fields(res, batch, n),
                bytes_streamed_per_step=None, stall_seconds_per_step=None)


def decode_fractions(settings, baseline: str) -> tuple[float, ...]:
    return (1.0,) if baseline == "transformers" else settings.fractions


def decode_rows(path, settings, baseline: str, device, dtype, at: Callable[[str], None]) -> Iterator[dict]:
    for fraction in decode_fractions(settings, baseline):
        at(f"{baseline} decode: loading at resident {fraction:g}")
        model, resident = load_baseline(path, baseline, fraction, device, dtype, settings.prefetch_depth)
        gen = runs.hf_generator(model, device)
        try:
            for batch in settings.batches:
                for n in settings.output_lengths:
                    at(f"{baseline} decode: resident {fraction:g}, batch {batch}, {n} tokens")
                    yield decode_row(gen, baseline, fraction, resident, batch, settings.prompt_tokens, n,
                                     settings.rounds(), model.config.vocab_size)
        finally:
            model = gen = None  # the generator holds the model too; both go before the next one loads
            free(device)


def baseline_decode(path, settings, baseline: str, device=None, dtype=None,
                    progress: bool = True) -> list[dict]:
    """Decode rows (schema: decode_row, system `baseline`) of checkpoint `path` over the grid `settings`
    (profile.ProfileSettings): accelerate offloading the layers tidal streams at each resident fraction, or
    plain transformers at fraction 1.0 only."""
    require_hf()
    device, dtype = resolve(device, dtype)
    cells = Progress(len(decode_fractions(settings, check_baseline(baseline))) * len(settings.batches) *
                   len(settings.output_lengths), progress)
    rows = []
    try:
        with quiet_loads():
            for row in decode_rows(path, settings, baseline, device, dtype, cells.at):
                rows.append(row)
                cells.done()
    finally:
        cells.close()
    return rows
