"""An emulated host<->device link for a profile (CPU backend): the request checked, its document section, and
its calibration against a target machine's ratio of link to memory bandwidth."""
from __future__ import annotations

from ..backends.link import LinkEmulation, LinkTarget, coerce as coerce_link, layer_seconds_of_step
from ..backends.link import target as link_target
from ..errors import ConfigError
from . import runs
from .common import kv_pool_bytes
from .settings import ProfileSettings

LINK_SCOPE = ("tidal's copy queue: weight streaming, KV swap, preemption and resume copies, and the links "
              "section's copies; loading a checkpoint and any baseline's moves do not go through it")


def link_request(link, device):
    """`link` checked before anything runs: None, a LinkEmulation, or a LinkTarget to calibrate."""
    if link is None:
        return None
    if device.type != "cpu":
        raise ConfigError(f"link={str(link)!r}: emulation is for the CPU backend; {device} has a real link")
    if isinstance(link, (str, LinkTarget)):
        return link_target(link)
    return coerce_link(link)


def describe_link(link, method: str | None = None) -> dict:
    """The document's `link` section of an emulated link (schema: link)."""
    d = link.describe()
    return {"emulated": True, "gbps": d["gbps"], "label": link.label, "target": d.get("target") or None,
            "ratio": d.get("ratio"), "layer_bytes": d.get("layer_bytes"),
            "layer_seconds": d.get("layer_seconds"), "method": method, "scope": LINK_SCOPE}


def head_bytes(placement) -> int:
    """Bytes of the LM head, which every decode step reads beside its layers."""
    c = placement.model
    return c.vocab_size * c.hidden_size * placement.dtype.itemsize


def calibrate_link(placement, target, settings: ProfileSettings | None = None):
    """A LinkEmulation on which a decoder layer of the model of `placement` (`Engine.placement`) copies in
    target's ratio times its decode time here: the all-resident decode step at batch 1, measured as
    `tidal profile` measures a cell, shared among the weights it reads by bytes
    (`link.layer_seconds_of_step`). `target`: a name of `tidal.backends.link.TARGETS` or a LinkTarget."""
    return calibrate(link_target(target), placement, settings or ProfileSettings.quick(), lambda _: None)[0]


def calibrate(target, placement, s: ProfileSettings, at) -> tuple:
    from ..engine import Engine

    n = min(s.output_lengths)
    at(f"link: calibrating {target.name} on the all-resident decode, batch 1, {n} tokens")
    kv_bytes = kv_pool_bytes(s.prompt_tokens + n, 1, placement.kv)
    with Engine.from_pretrained(placement.checkpoint.path, device=placement.device, dtype=placement.dtype,
                                resident_fraction=1.0, kv_cache_bytes=kv_bytes, host_kv_bytes=0,
                                max_batch_size=1) as engine:
        prompts = runs.same_length_prompts(1, s.prompt_tokens, placement.model.vocab_size)
        res = runs.decode_rounds({"tidal": runs.tidal_generator(engine)}, prompts, n, warmup_tokens=n,
                                 **s.rounds())["tidal"]
    if not res["step_s"] > 0:
        raise ConfigError(f"link calibration: {n} new tokens took no longer than 1; give longer "
                          f"--output-lengths")
    c, layer = placement.model, model_layer_bytes(placement)
    seconds = layer_seconds_of_step(res["step_s"], c.num_layers, layer, head_bytes(placement))
    method = (f"all-resident decode step at batch 1 ({n} new tokens after {s.prompt_tokens}-token prompts, "
              f"median of {res['rounds']} rounds after a warm-up: {res['step_s'] * 1e3:.3g} ms), shared by "
              f"bytes read: layer_seconds = step * layer_bytes / (num_layers * layer_bytes + LM head bytes); "
              f"gbps = layer_bytes / (ratio * layer_seconds); ratio = the target's device memory GB/s over "
              f"its link GB/s (tidal.backends.link)")
    return LinkEmulation.like(target, layer, seconds), method


def model_layer_bytes(placement) -> int:
    from .. import weights as W

    return W.layer_bytes(placement.model, placement.dtype)
