"""The one bridge that moves block ids to the device: block tables, sequence lengths and slot mappings for a
batch, filled in a pinned host buffer through a numpy view and uploaded with one non-blocking copy.

Layouts (what `tidal.kernels.paged_decode_attention` and `write_kv` take):
  block_tables  [batch, max_blocks] int32, row i = sequence i's blocks, padded with PAD_BLOCK_ID
  seq_lens      [batch] int32
  slot_mapping  [num_new_tokens] int32, slot = block_id * block_size + offset, sequences back to back
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

# Padding in block tables: an in-range block id, so that an unmasked load of a padded entry stays inside the
# pool. Kernels must mask by seq_lens; a padded entry's contents are never meaningful.
PAD_BLOCK_ID = 0


@dataclasses.dataclass(frozen=True)
class BatchMetadata:
    """Device tensors for one step over a batch of sequences (see the module doc for layouts)."""

    block_tables: torch.Tensor  # [batch, max_blocks] int32
    seq_lens: torch.Tensor  # [batch] int32
    slot_mapping: torch.Tensor  # [sum(num_new)] int32


def slots(table: list[int], block_size: int, start: int, stop: int) -> np.ndarray:
    """Slot ids of token positions [start, stop) of a sequence with block table `table`."""
    pos = np.arange(start, stop, dtype=np.int64)
    return np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


def build(tables: list[list[int]], lens: list[int], num_new: list[int], block_size: int,
          device: torch.device) -> BatchMetadata:
    """Fill one int32 host buffer (pinned when the device is CUDA) and upload it with one copy."""
    batch = len(tables)
    width = max((len(t) for t in tables), default=0)
    total_new = sum(num_new)
    pinned = device.type == "cuda"
    # A fresh buffer per call from torch's caching host allocator: it is reused only after the copy that
    # read it has finished, so a later step can never overwrite ids an earlier upload has not read yet.
    host = torch.empty(batch * width + batch + total_new, dtype=torch.int32, pin_memory=pinned)
    flat = host.numpy()
    bt = flat[:batch * width].reshape(batch, width)
    bt.fill(PAD_BLOCK_ID)
    pos = batch * width + batch
    for i, (table, n, new) in enumerate(zip(tables, lens, num_new)):
        bt[i, :len(table)] = table
        flat[pos:pos + new] = slots(table, block_size, n - new, n)
        pos += new
    flat[batch * width:batch * width + batch] = lens
    dev = host.to(device, non_blocking=True) if pinned else host
    return BatchMetadata(dev[:batch * width].view(batch, width), dev[batch * width:batch * width + batch],
                         dev[batch * width + batch:])
