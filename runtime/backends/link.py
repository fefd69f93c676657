"""Link emulation for the CPU backend: make the copy queue behave like a host<->device link of a set bandwidth.

On the CPU backend "device" and "host" share one DRAM, so a streamed layer costs about as much to copy as to
compute and offloading looks nearly free. With a `LinkEmulation`, every piece of work on the copy queue (the
link: weight streaming, KV swap, preemption and resume copies) takes at least `nbytes / bandwidth`; the
waiting happens on the copy thread, so compute overlaps it as it overlaps a GPU's copy engine.

A bandwidth can be given directly, or derived from a target: "as an H100 on PCIe Gen4" means that copying
one decoder layer takes as many times its all-resident decode time here as it does there. At batch 1 a
layer's decode on a GPU is memory-bound (every weight read once), so there it takes layer_bytes / HBM
bandwidth, and the copy layer_bytes / link bandwidth: the ratio is HBM GB/s over link GB/s, whatever the
model. Measured here (the model's decode step, shared by bytes: `layer_seconds_of_step`), the emulated link
is layer_bytes / (ratio * layer_seconds). Everything in this module is plain arithmetic; the measurement is
`tidal.study.emulation.calibrate_link`.
"""
from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError


def _positive(name: str, value, integer: bool = False) -> float:
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a finite {'int' if integer else 'number'} > 0")
    return value if integer else float(value)


# Published figures, GB/s (1e9 bytes/s). Device memory: NVIDIA's datasheets (H100 SXM5 HBM3 3.35 TB/s; H100
# PCIe HBM2e 2.0 TB/s; H200 SXM HBM3e 4.8 TB/s; A100 80GB SXM HBM2e 2.039 TB/s; RTX A6000 GDDR6 768 GB/s and
# RTX 5000 Ada GDDR6 576 GB/s, the published study's two GPUs). Links: PCIe Gen4 x16 is 32 GB/s per direction
# in theory (31.5 after encoding) and about 25 GB/s achieved from pinned memory; Gen5 x16 64 (63) and about 50
# achieved. The study itself measured 13-16 GB/s host-to-device on Gen4 (../shared/PAPER.md), per-tensor
# copies included; "achieved" is a large pinned copy's rate, what tidal's batched copies approach.
DEVICES = {  # name: (what, memory GB/s)
    "h100": ("H100 SXM", 3350.0),
    "h100pcie": ("H100 PCIe", 2000.0),
    "h200": ("H200", 4800.0),
    "a100": ("A100 80GB", 2039.0),
    "a6000": ("RTX A6000", 768.0),
    "rtx5000ada": ("RTX 5000 Ada", 576.0),
}
LINKS = {  # name: (what, achieved GB/s)
    "pcie4": ("PCIe Gen4 x16", 25.0),
    "pcie5": ("PCIe Gen5 x16", 50.0),
}


@dataclasses.dataclass(frozen=True)
class LinkTarget:
    """A device and the link to its host, from published figures: `device_gbps` (its memory bandwidth, which
    bounds a batch-1 decode) and `link_gbps` (host<->device copies). `ratio` is one layer's copy time over its
    decode time there."""

    name: str
    device: str
    device_gbps: float
    link: str
    link_gbps: float

    def __post_init__(self):
        object.__setattr__(self, "device_gbps", _positive("device_gbps", self.device_gbps))
        object.__setattr__(self, "link_gbps", _positive("link_gbps", self.link_gbps))

    @property
    def ratio(self) -> float:
        return self.device_gbps / self.link_gbps

    def __str__(self) -> str:
        return f"{self.device} on {self.link}"


# Each device on the PCIe generation it ships with (A100, RTX A6000, RTX 5000 Ada: Gen4; H100, H200: Gen5),
# and the Hopper parts on Gen4 too: the published study's link, in a Gen4 host.
PAIRS = (("h100", "pcie5"), ("h100", "pcie4"), ("h100pcie", "pcie5"), ("h100pcie", "pcie4"), ("h200", "pcie5"),
         ("h200", "pcie4"), ("a100", "pcie4"), ("a6000", "pcie4"), ("rtx5000ada", "pcie4"))
TARGETS = {f"{d}-{k}": LinkTarget(f"{d}-{k}", *DEVICES[d], *LINKS[k]) for d, k in PAIRS}


def target(name) -> LinkTarget:
    """The registered target `name` (DEVICE-LINK, e.g. "h100-pcie4"; `TARGETS` lists them)."""
    if isinstance(name, LinkTarget):
        return name
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"link target {name!r} is unknown; targets: {', '.join(TARGETS)}") from None


@dataclasses.dataclass(frozen=True)
class LinkDerivation:
    """How an emulated bandwidth was derived: `ratio` (a layer's copy time over its decode time, from
    `target` when one was named), for a layer of `layer_bytes` bytes that decodes in `layer_seconds` here."""

    ratio: float
    layer_bytes: int
    layer_seconds: float
    target: str = ""

    def __post_init__(self):
        object.__setattr__(self, "ratio", _positive("ratio", self.ratio))
        _positive("layer_bytes", self.layer_bytes, integer=True)
        object.__setattr__(self, "layer_seconds", _positive("layer_seconds", self.layer_seconds))


@dataclasses.dataclass(frozen=True)
class LinkEmulation:
    """An emulated host<->device link of `gbps` (1e9 bytes per second) in each direction. `label` says what
    it stands for (e.g. "as an H100 on PCIe Gen4"); every figure and JSON document made with it carries it.
    `derivation` is set by `from_ratio` and `like`."""

    gbps: float
    label: str = ""
    derivation: LinkDerivation | None = None

    def __post_init__(self):
        g = self.gbps
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0 or g != g or g == float("inf"):
            raise ConfigError(f"link gbps={g!r} must be a finite number > 0")
        object.__setattr__(self, "gbps", float(g))
        if not isinstance(self.label, str):
            raise ConfigError(f"link label={self.label!r} must be a string")
        if self.derivation is not None and not isinstance(self.derivation, LinkDerivation):
            raise ConfigError(f"link derivation={self.derivation!r} must be a LinkDerivation")

    @classmethod
    def from_ratio(cls, ratio: float, layer_bytes: int, layer_seconds: float, label: str = "",
                   target_name: str = "") -> "LinkEmulation":
        """The link on which one layer of `layer_bytes` copies in `ratio` times `layer_seconds` (its decode
        time here): gbps = layer_bytes / (ratio * layer_seconds) / 1e9."""
        d = LinkDerivation(ratio, layer_bytes, layer_seconds, target_name)
        gbps = d.layer_bytes / (d.ratio * d.layer_seconds) / 1e9
        return cls(gbps, label or f"copy/decode ratio {d.ratio:.3g}", d)

    @classmethod
    def like(cls, name, layer_bytes: int, layer_seconds: float) -> "LinkEmulation":
        """The link that gives a layer here the copy/decode ratio it has on target `name` (a `TARGETS` key,
        e.g. "h100-pcie4", or a LinkTarget)."""
        t = target(name)
        return cls.from_ratio(t.ratio, layer_bytes, layer_seconds,
                              f"as an {t} ({t.device_gbps:g}/{t.link_gbps:g} GB/s: a layer's copy "
                              f"{t.ratio:.3g}x its decode)", t.name)

    def seconds(self, nbytes: int) -> float:
        """The least time `nbytes` take over this link."""
        return nbytes / (self.gbps * 1e9)

    def describe(self) -> dict:
        d = {"emulated": True, "gbps": self.gbps, "label": self.label or f"{self.gbps:g} GB/s link"}
        if self.derivation is not None:
            d.update(dataclasses.asdict(self.derivation))
        return d

    def __str__(self) -> str:
        return self.label or f"emulated {self.gbps:g} GB/s link"


def layer_seconds_of_step(step_seconds: float, num_layers: int, layer_bytes: int, other_bytes: int) -> float:
    """One layer's share of an all-resident decode step that reads `num_layers` layers of `layer_bytes` and
    `other_bytes` more (the LM head): the step shared by bytes read, the memory-bound premise that the
    targets' ratios rest on."""
    _positive("step_seconds", step_seconds)
    _positive("num_layers", num_layers, integer=True)
    _positive("layer_bytes", layer_bytes, integer=True)
    if isinstance(other_bytes, bool) or not isinstance(other_bytes, int) or other_bytes < 0:
        raise ConfigError(f"other_bytes={other_bytes!r} must be an int >= 0")
    return step_seconds * layer_bytes / (num_layers * layer_bytes + other_bytes)


def parse(text: str, option: str = "--link") -> float | LinkTarget:
    """A --link value: a bandwidth in GB/s ("2.5") or a target name ("h100-pcie4"). ConfigError naming
    `option` for anything else."""
    try:
        gbps = float(text)
    except (TypeError, ValueError):
        if text in TARGETS:
            return TARGETS[text]
        raise ConfigError(f"{option} {text!r}: neither a bandwidth in GB/s nor a target "
                          f"({', '.join(TARGETS)})") from None
    if not math.isfinite(gbps) or gbps <= 0:
        raise ConfigError(f"{option} {text!r}: a bandwidth must be a finite number of GB/s > 0")
    return gbps


def coerce(link, name: str = "link") -> LinkEmulation | None:
    """`link` as a LinkEmulation: None, a LinkEmulation, or a bandwidth in GB/s. A target name needs this
    machine's layer time first (`LinkEmulation.like`, or `tidal.study.emulation.calibrate_link`)."""
    if link is None or isinstance(link, LinkEmulation):
        return link
    if isinstance(link, (str, LinkTarget)):
        raise ConfigError(f"{name}={str(link)!r}: a target needs this machine's decode time per layer; "
                          f"pass LinkEmulation.like(target, layer_bytes=..., layer_seconds=...) or a "
                          f"bandwidth in GB/s")
    if isinstance(link, bool) or not isinstance(link, (int, float)) or not math.isfinite(link) or link <= 0:
        raise ConfigError(f"{name}={link!r} must be a LinkEmulation or a bandwidth in GB/s > 0")
    return LinkEmulation(float(link))
