"""What a baseline's rows measure differently from tidal's, one sentence each: printed by the CLI, drawn under
the figure and carried in each baseline row's `note`."""
from __future__ import annotations

from .baseline_decode import check_baseline
from .common import link_text


def notes(baseline: str, device, link: dict | None = None) -> list[str]:
    """What the baseline's rows measure differently from tidal's on `device` (with tidal's copies through the
    emulated `link`, a document's `link` section, if any), one sentence each."""
    return decode_notes(baseline, device, link) + preemption_notes(device, link)


def link_note(link: dict | None) -> list[str]:
    """The note of every baseline row measured beside tidal's emulated `link` (none without one)."""
    if link is None:
        return []
    return [f"emulated link ({link_text(link)}): it paces tidal's copies only; the "
            f"baselines' moves do not go through it, so their rows are not slowed by it and compare with "
            f"tidal's only on what does not cross the link"]


def decode_notes(baseline: str, device, link: dict | None = None) -> list[str]:
    """`notes` of the baseline's decode rows (each row carries them, joined, in its `note`)."""
    import torch

    out = []
    if check_baseline(baseline) == "transformers":
        out.append("transformers decode: plain transformers cannot offload layers, so it is measured with "
                   "every layer resident, at resident fraction 1.0 only")
    elif torch.device(device).type == "cpu":
        out.append("accelerate on the CPU backend: its offload hooks run for every offloaded layer at every "
                   "forward but move no bytes (.to('cpu') of a CPU tensor is the tensor itself), so only its "
                   "host overhead compares here; compare transfer cost on a GPU")
    out.append(f"{baseline} decode rows: bytes_streamed_per_step and stall_seconds_per_step are null "
               f"({baseline} does not report them)")
    return out + link_note(link)


def preemption_notes(device, link: dict | None = None) -> list[str]:
    """`notes` of the transformers protocol's preemption rows (each row carries them in its `note`)."""
    import torch

    out = ["transformers preemption: a fully resident model with a real context (prefilled), its KV "
           "moved tensor by tensor; the first token after resume is checked against the uninterrupted run"]
    if torch.device(device).type == "cpu":
        out.append("transformers preemption on the CPU backend: model.to and the KV tensors' .to between "
                   "host and device would move nothing (both are host memory); every such move is emulated "
                   "by a copy into fresh tensors (clone), the memcpy a device move costs")
    out.append("transformers disk resume: disk_seconds is from_pretrained's; reads it defers (a "
               "memory-mapped checkpoint) land in the move to the device and the first token")
    return out + link_note(link)
