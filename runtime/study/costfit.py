"""The cost model of a profile document: its rows as `tidal.costmodel` samples, fitted less a held-out part,
and the error on that part (the document's costmodel section)."""
from __future__ import annotations

from ..errors import ConfigError

HOLDOUT_FRACTION = 0.25
HOLDOUT_SEED = 0


def decode_samples(doc: dict) -> list:
    """tidal.costmodel DecodeSamples of the document's tidal decode rows (context: the row's mean context)."""
    from ..costmodel import DecodeSample

    m = doc["model"]
    return [DecodeSample(m["num_layers"], r["resident_layers"], m["layer_bytes"], r["batch"],
                         round(r["mean_context"]), r["step_seconds"])
            for r in doc["decode"] if r["system"] == "tidal"]


def transfer_samples(doc: dict) -> list:
    """tidal.costmodel TransferSamples of the document's tidal preemption rows: per row, each transfer that
    moved something. weights_disk_in is the checkpoint read plus the copy to the device (what a disk resume
    pays for its weights), over the bytes read (`disk_bytes`: the device regions and any streamed layers)."""
    from ..costmodel import TransferSample

    out = []
    for r in doc["preemption"]:
        if r["system"] != "tidal":
            continue
        if r["weights"] == "host":
            out.append(TransferSample("weights_host_out", r["weight_bytes"], r["weight_out_seconds"]))
            out.append(TransferSample("weights_host_in", r["weight_bytes"], r["weight_in_seconds"]))
        else:
            seconds = r["disk_seconds"] + r["weight_in_seconds"]
            out.append(TransferSample("weights_disk_in", r["disk_bytes"], seconds))
        if r["kv"] == "swap":
            out.append(TransferSample("kv_swap_out", r["kv_bytes"], r["kv_out_seconds"]))
            out.append(TransferSample("kv_swap_in", r["kv_bytes"], r["kv_in_seconds"]))
        elif r["recompute_tokens"]:
            out.append(TransferSample("kv_recompute", 0, r["recompute_seconds"],
                                      tokens=r["recompute_tokens"]))
    return out


def fit_costmodel(doc: dict) -> dict:
    """The document's costmodel section: tidal.costmodel fitted to the samples of the decode and preemption
    rows less a held-out part (`costmodel.holdout_split`, HOLDOUT_FRACTION, HOLDOUT_SEED), and the relative
    error of its predictions on that part. `fitted` is that model (fitted without the held-out samples, so the
    error is an honest estimate for it). A part that cannot be done is null, with the reason."""
    from .. import costmodel

    try:
        samples = decode_samples(doc) + transfer_samples(doc)
        if not samples:
            return {"fitted": None, "holdout": None, "reason": "no rows to fit"}
        fit, held = costmodel.holdout_split(samples, HOLDOUT_FRACTION, HOLDOUT_SEED)
        split = lambda group, cls: [x for x in group if isinstance(x, cls)]  # noqa: E731
        model = costmodel.CostModel.fit(split(fit, costmodel.DecodeSample),
                                        split(fit, costmodel.TransferSample))
    except ConfigError as exc:
        return {"fitted": None, "holdout": None, "reason": f"the fit failed: {exc}"}
    section = {"fitted": model.to_dict(), "holdout": None, "reason": None}
    if not held:
        section["reason"] = ("no sample could be held out without leaving part of the fit undetermined; "
                             "measure more of the grid")
        return section
    try:
        ev = model.evaluate(split(held, costmodel.DecodeSample), split(held, costmodel.TransferSample))
    except ConfigError as exc:
        section["reason"] = f"the held-out samples could not be predicted: {exc}"
        return section
    section["holdout"] = {"n": ev.n, "median_relative_error": ev.median_relative_error,
                          "max_relative_error": ev.max_relative_error, "fraction": HOLDOUT_FRACTION,
                          "seed": HOLDOUT_SEED}
    return section
