"""Where a measuring run is and its progress bar."""
from __future__ import annotations

import sys


class Progress:
    """Where a run is (an interrupted run's `interrupted_at`) and its progress bar on stderr (only on a
    terminal, and only with `progress`)."""

    def __init__(self, total: int, progress: bool):
        from tqdm import tqdm

        self.where = "start"
        self.bar = tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True, leave=False,
                        disable=not (progress and sys.stderr.isatty()))

    def at(self, where: str) -> None:
        self.where = where
        self.bar.set_description(where)  # shown while the cell runs

    def done(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
