"""The cost model of one model on one machine (`CostModel`) and its predictions: a decode step, a transfer, a
preemption and a resume. This is what a scheduler or a simulator imports."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..errors import ConfigError
from ..modes import check_modes
from .checks import check_int, from_dict
from .evaluate import Evaluation
from .fit import fit_links, fit_step
from .parts import LinkFit, RecomputeFit, StepFit
from .samples import LINK_KINDS, TRANSFER_KINDS, DecodeSample, TransferSample

VERSION = 1  # of the dict `CostModel.to_dict` writes


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Fitted costs of one model on one machine (see the module docstring for the equations). Build it with
    `CostModel.fit`; `fit_notes` says what the samples could not identify and what was done instead."""

    step: StepFit | None
    links: tuple[LinkFit, ...]
    recompute: RecomputeFit | None
    fit_notes: tuple[str, ...] = ()

    def __post_init__(self):
        links = tuple(self.links)
        kinds = [l.kind for l in links]
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"links: a transfer kind appears twice in {kinds}")
        object.__setattr__(self, "links", tuple(sorted(links, key=lambda l: LINK_KINDS.index(l.kind))))
        notes = tuple(self.fit_notes)
        if not all(isinstance(n, str) for n in notes):
            raise ConfigError("fit_notes must be strings")
        object.__setattr__(self, "fit_notes", notes)

    @classmethod
    def fit(cls, decode: Sequence[DecodeSample] = (),
            transfers: Sequence[TransferSample] = ()) -> "CostModel":
        """Fit every part the samples measure. Decode samples must all come from one model (same num_layers
        and layer_bytes), else ConfigError."""
        decode, transfers = list(decode), list(transfers)
        for name, group, typ in (("decode", decode, DecodeSample), ("transfers", transfers, TransferSample)):
            bad = [s for s in group if not isinstance(s, typ)]
            if bad:
                raise ConfigError(f"{name}: {bad[0]!r} is not a {typ.__name__}")
        if not decode and not transfers:
            raise ConfigError("CostModel.fit: no samples")
        notes: list[str] = []
        step = None
        if decode:
            step, more = fit_step(decode)
            notes += more
        links, recompute, more = fit_links(transfers)
        return cls(step, tuple(links), recompute, tuple(notes + more))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The transfer kinds this model can predict."""
        return tuple(l.kind for l in self.links) + (("kv_recompute",) if self.recompute else ())

    def predict_step(self, resident_layers: int, batch: int, context: int) -> float:
        """Seconds of one decode step: `resident_layers` resident, `batch` sequences of `context` tokens."""
        if self.step is None:
            raise ConfigError("decode step: no decode samples were measured")
        return self.step.seconds(resident_layers, batch, context)

    def predict_prefill(self, resident_layers: int, tokens: int) -> float:
        """Seconds of one prefill pass over `tokens` prompt tokens with `resident_layers` resident. The pass
        streams the model's other layers as a decode step does (the engine runs decode and prefill as two
        passes, so a step that does both streams them twice): the `kv_recompute` fit (a prefill measured
        all-resident) in place of T0 in the step's formula, max(P, S*layer_bytes/stream_bandwidth) +
        S*stream_overhead. Without a recompute fit, a decode step of one sequence at `tokens` context."""
        if self.recompute is None:
            return self.predict_step(resident_layers, 1, tokens)
        if self.step is None:
            raise ConfigError("prefill: no decode samples were measured, so streaming is unknown")
        check_int("resident_layers", resident_layers, 0)
        if resident_layers > self.step.num_layers:
            raise ConfigError(f"resident_layers={resident_layers} exceeds the model's {self.step.num_layers} "
                              "layers")
        check_int("tokens", tokens, 0)
        return self.step.streamed(self.recompute.seconds(tokens), self.step.num_layers - resident_layers)

    def predict_transfer(self, kind: str, nbytes: int = 0, tokens: int = 0) -> float:
        """Seconds of one transfer of `kind`; `tokens` for "kv_recompute", `nbytes` for the others."""
        if kind not in TRANSFER_KINDS:
            raise ConfigError(f"kind={kind!r} must be one of {TRANSFER_KINDS}")
        if kind == "kv_recompute":
            if self.recompute is None:
                raise ConfigError("kv_recompute was never measured; no prediction for it")
            return self.recompute.seconds(tokens)
        for link in self.links:
            if link.kind == kind:
                return link.seconds(nbytes)
        raise ConfigError(f"{kind} was never measured; no prediction for it")

    def _moved(self, kind: str, nbytes: int) -> float:
        # nothing moved costs nothing: preempt and resume skip a copy they have no bytes for
        return self.predict_transfer(kind, nbytes) if nbytes else 0.0

    def predict_preempt(self, weight_bytes: int, kv_bytes: int, weights: str = "host",
                        kv: str = "swap") -> dict:
        """Seconds of `Engine.preempt(weights, kv)`: {"weights", "kv", "total"}. Only "host" copies weights
        ("disk" and "keep" release or keep them), only "swap" copies KV; bookkeeping is not modelled. An
        engine with keep_host_copy copies no weights either: pass weight_bytes=0 for it."""
        check_modes(weights, kv)
        check_int("weight_bytes", weight_bytes, 0)
        check_int("kv_bytes", kv_bytes, 0)
        w = self._moved("weights_host_out", weight_bytes) if weights == "host" else 0.0
        k = self._moved("kv_swap_out", kv_bytes) if kv == "swap" else 0.0
        return {"weights": w, "kv": k, "total": w + k}

    def predict_resume(self, weight_bytes: int, kv_bytes: int, weights: str = "host", kv: str = "swap",
                       recompute_tokens: int = 0, pipelined: bool = False, *,
                       resident_layers: int | None = None, batch: int = 1, context: int = 0,
                       first_region_bytes: int | None = None) -> dict:
        """Seconds of `Engine.resume(pipelined)` after `preempt(weights, kv)`: {"weights", "kv", "recompute",
        "total", "first_token"}.

        total = weights + kv + recompute: the weights back ("host": weights_host_in; "disk": weights_disk_in,
        which covers the read and the copy; "keep": 0), the KV swapped in, the dropped KV prefilled again.
        first_token approximates when the first step's tokens are out. That step decodes the `batch` swapped
        requests (at `context` tokens, `resident_layers` resident, default all; no decode when
        kv="recompute" or batch=0) and prefills the recomputed ones. Unpipelined: total + the decode step. Pipelined (weights=
        "host"): the KV and the first region (`first_region_bytes`, the embeddings + first layer; default one
        decoder layer) arrive first, then the step runs while the rest arrives, so it ends no earlier than
        the last copy: kv + first + max(decode step + recompute, rest of the weights). A pipelined "disk"
        resume is predicted as unpipelined (its read comes before any copy; this overstates first_token by at
        most the host-to-device part). first_token is None when no request is in flight."""
        check_modes(weights, kv)
        if not isinstance(pipelined, bool):
            raise ConfigError(f"pipelined={pipelined!r} must be a bool")
        check_int("weight_bytes", weight_bytes, 0)
        check_int("kv_bytes", kv_bytes, 0)
        check_int("recompute_tokens", recompute_tokens, 0)
        check_int("batch", batch, 0)
        kind = {"host": "weights_host_in", "disk": "weights_disk_in"}.get(weights)
        w = self._moved(kind, weight_bytes) if kind else 0.0
        k = self._moved("kv_swap_in", kv_bytes) if kv == "swap" else 0.0
        r = self.predict_transfer("kv_recompute", tokens=recompute_tokens) if recompute_tokens else 0.0
        total = w + k + r
        decoding = kv == "swap" and batch > 0
        if not decoding and not recompute_tokens:
            first_token = None
        else:
            if decoding:
                if resident_layers is None:
                    resident_layers = self.step.num_layers if self.step is not None else 0
                step = self.predict_step(resident_layers, batch, context)
            else:
                step = 0.0
            first_token = total + step
            if pipelined and weights == "host" and weight_bytes:
                if first_region_bytes is None:
                    first_region_bytes = self.step.layer_bytes if self.step is not None else 0
                check_int("first_region_bytes", first_region_bytes, 0)
                first = self.predict_transfer("weights_host_in", min(first_region_bytes, weight_bytes))
                first_token = k + first + max(step + r, w - first)
        return {"weights": w, "kv": k, "recompute": r, "total": total, "first_token": first_token}

    def evaluate(self, decode_samples: Sequence[DecodeSample] = (),
                 transfer_samples: Sequence[TransferSample] = ()) -> "Evaluation":
        """Relative errors (predicted - measured) / measured of each sample, in the order given."""
        if not decode_samples and not transfer_samples:
            raise ConfigError("evaluate: no samples")
        d = tuple((self.predict_step(s.resident_layers, s.batch, s.context) - s.step_seconds) / s.step_seconds
                  for s in decode_samples)
        t = tuple((self.predict_transfer(s.kind, s.nbytes, s.tokens) - s.seconds) / s.seconds
                  for s in transfer_samples)
        return Evaluation(d, t)

    def to_dict(self) -> dict:
        """A JSON-safe dict; `from_dict` reads it back."""
        return {"version": VERSION, "step": self.step.to_dict() if self.step else None,
                "links": [l.to_dict() for l in self.links],
                "recompute": self.recompute.to_dict() if self.recompute else None,
                "fit_notes": list(self.fit_notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        if not isinstance(d, dict) or d.get("version") != VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"CostModel.from_dict: version {got!r}, this tidal reads version {VERSION}")

        def convert(kw):
            if not isinstance(kw["links"], list):
                raise ConfigError("CostModel.from_dict: links must be a list")
            step, recompute = kw["step"], kw["recompute"]
            return dict(step=StepFit.from_dict(step) if step is not None else None,
                        links=tuple(LinkFit.from_dict(l) for l in kw["links"]),
                        recompute=RecomputeFit.from_dict(recompute) if recompute is not None else None,
                        fit_notes=tuple(kw["fit_notes"]))

        return from_dict(cls, {k: v for k, v in d.items() if k != "version"}, convert)
