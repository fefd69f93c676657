"""What `Engine.preempt`, `Engine.resume` and `Engine.set_residency` report: the bytes and seconds of each
part, weight traffic apart from KV traffic (torch-free)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from ..plan import ResidencyPlan


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


class _Report:
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(weight_gbps=self.weight_gbps, kv_gbps=self.kv_gbps)
        return d

    @property
    def weight_gbps(self) -> float:
        return _gbps(self.weight_bytes, self.weight_seconds)

    @property
    def kv_gbps(self) -> float:
        return _gbps(self.kv_bytes, self.kv_seconds)

    @property
    def unaccounted_seconds(self) -> float:
        """Total less the sum of the parts (plus their overlap): host time no part measured."""
        return self.total_seconds - (self.parts_seconds - self.overlap_seconds)

    def _line(self, what: str, nbytes: int, seconds: float) -> str:
        return f"{what} {nbytes / 1e6:.1f} MB in {seconds * 1e3:.2f} ms ({_gbps(nbytes, seconds):.2f} GB/s)"


@dataclasses.dataclass(frozen=True)
class PreemptionReport(_Report):
    """What `Engine.preempt` moved and what each part cost. `weight_bytes`: the weight bytes released from
    the device (every mode but "keep"); `weight_seconds`: the copy of them to the host (weights="host"; 0
    for "disk", which copies nothing, and when `host_copy_reused`: an engine built with keep_host_copy holds
    that copy already). `kv_*`: the batched swap of running requests' blocks. Requests the
    host pool could not take are dropped (`kv_recompute_requests`) and recomputed after resume."""

    model: str
    weights: str
    kv: str
    weight_bytes: int
    weight_seconds: float
    kv_bytes: int
    kv_seconds: float
    kv_swapped_requests: int
    kv_recompute_requests: int
    kv_recompute_tokens: int
    device_bytes_released: int  # weights + streaming ring + KV pool
    host_bytes_released: int  # weights="disk": the streamed layers' host arena (and a kept host copy)
    bookkeeping_seconds: float
    total_seconds: float
    overlap_seconds: float = 0.0
    host_copy_reused: bool = False

    @property
    def parts_seconds(self) -> float:
        return self.bookkeeping_seconds + self.weight_seconds + self.kv_seconds

    def __str__(self) -> str:
        weights = (self._line("weights", self.weight_bytes, self.weight_seconds)
                   if self.weights == "host" and not self.host_copy_reused else
                   f"weights {self.weight_bytes / 1e6:.1f} MB released, not copied"
                   + (" (host copy kept)" if self.host_copy_reused else ""))
        return (f"preempt {self.model} (weights={self.weights}, kv={self.kv}) in {self.total_seconds * 1e3:.2f} ms: "
                f"{weights}; "
                f"{self._line('KV', self.kv_bytes, self.kv_seconds)} ({self.kv_swapped_requests} requests swapped, "
                f"{self.kv_recompute_requests} dropped); bookkeeping {self.bookkeeping_seconds * 1e3:.2f} ms; "
                f"{self.device_bytes_released / 1e6:.1f} MB of device memory released")


@dataclasses.dataclass(frozen=True)
class ResumeReport(_Report):
    """What `Engine.resume` moved and what each part cost. `disk_*`: the checkpoint read back (after
    weights="disk"), through `loader`. `weight_*`: host-to-device copies of the weight regions. `kv_*`: the
    batched swap-in. `recompute_*`: the prefill of requests whose KV was dropped (their tokens, and their
    share by tokens of the step's prefill seconds). `first_step_seconds`: the first step after resume,
    recompute and requests queued before the resume (a scheduler hands them over first) included; with
    `pipelined`, the weight copies overlap it (`overlap_seconds`). `time_to_first_layer`: from the call until
    the embeddings and the first resident layer are on the device. `time_to_first_token`: until the first
    step's tokens are on the host (None without requests)."""

    model: str
    weights: str
    pipelined: bool
    loader: str
    disk_bytes: int
    disk_seconds: float
    weight_bytes: int
    weight_seconds: float
    kv_bytes: int
    kv_seconds: float
    recompute_tokens: int
    recompute_seconds: float
    first_step_seconds: float
    bookkeeping_seconds: float
    total_seconds: float
    overlap_seconds: float
    time_to_first_layer: float | None
    time_to_first_token: float | None

    @property
    def parts_seconds(self) -> float:
        return (self.bookkeeping_seconds + self.disk_seconds + self.weight_seconds + self.kv_seconds +
                self.first_step_seconds)

    def __str__(self) -> str:
        ttft = "n/a" if self.time_to_first_token is None else f"{self.time_to_first_token * 1e3:.2f} ms"
        ttfl = "n/a" if self.time_to_first_layer is None else f"{self.time_to_first_layer * 1e3:.2f} ms"
        disk = f"{self._line('disk', self.disk_bytes, self.disk_seconds)} via {self.loader}; " if self.disk_bytes else ""
        return (f"resume {self.model} ({'pipelined' if self.pipelined else 'full'} from {self.weights}) in "
                f"{self.total_seconds * 1e3:.2f} ms: {disk}{self._line('weights', self.weight_bytes, self.weight_seconds)}; "
                f"{self._line('KV', self.kv_bytes, self.kv_seconds)}; recompute {self.recompute_tokens} tokens in "
                f"{self.recompute_seconds * 1e3:.2f} ms; first step {self.first_step_seconds * 1e3:.2f} ms "
                f"(overlap {self.overlap_seconds * 1e3:.2f} ms); bookkeeping {self.bookkeeping_seconds * 1e3:.2f} ms; "
                f"first layer {ttfl}, first token {ttft}")


@dataclasses.dataclass(frozen=True)
class ResidencyReport:
    """What `Engine.set_residency` changed and what it cost. `promoted`: layers made resident (copied host to
    device, `to_device_bytes`); `demoted`: layers now streamed, whose device bytes were released
    (`to_host_bytes` of them copied to the host first: a layer with a host copy already copies nothing).
    `to_host_seconds`: the demotion copy, on the copy queue. `to_device_seconds`: the promotion copies on the
    copy queue, or None when the call returned with them still in flight (`wait=False`: decoding goes on
    while they land). `device_bytes_before/after`: the engine's device footprint (weights, ring, KV pool)."""

    model: str
    old_plan: ResidencyPlan
    new_plan: ResidencyPlan
    promoted: tuple[int, ...]
    demoted: tuple[int, ...]
    to_device_bytes: int
    to_host_bytes: int
    to_device_seconds: float | None
    to_host_seconds: float
    ring_bytes_before: int
    ring_bytes_after: int
    device_bytes_before: int
    device_bytes_after: int
    total_seconds: float

    @property
    def to_device_gbps(self) -> float | None:
        return None if self.to_device_seconds is None else _gbps(self.to_device_bytes, self.to_device_seconds)

    @property
    def to_host_gbps(self) -> float:
        return _gbps(self.to_host_bytes, self.to_host_seconds)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(old_plan=str(self.old_plan), new_plan=str(self.new_plan), to_device_gbps=self.to_device_gbps,
                 to_host_gbps=self.to_host_gbps)
        return d

    def __str__(self) -> str:
        up = ("in flight" if self.to_device_seconds is None else
              f"in {self.to_device_seconds * 1e3:.2f} ms ({self.to_device_gbps:.2f} GB/s)")
        return (f"residency of {self.model}: {self.old_plan} -> {self.new_plan} in {self.total_seconds * 1e3:.2f} ms; "
                f"promoted {list(self.promoted)} ({self.to_device_bytes / 1e6:.1f} MB to the device {up}); demoted "
                f"{list(self.demoted)} ({self.to_host_bytes / 1e6:.1f} MB to the host in "
                f"{self.to_host_seconds * 1e3:.2f} ms, {self.to_host_gbps:.2f} GB/s); device "
                f"{self.device_bytes_before / 1e6:.1f} -> {self.device_bytes_after / 1e6:.1f} MB")
