"""A kernel launch as data, so that the launcher and the ahead-of-time compile test
(tests/test_kernels_compile.py) read the same grid, arguments, constexprs and launch options from one function
per kernel, and cannot drift."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One launch of a `@triton.jit` kernel: `kernel[grid](*args, **constexprs, num_warps=, num_stages=)`.
    `args` are the runtime arguments in the kernel's order (tensors and Python scalars), `constexprs` the
    compile-time ones by name."""
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int = 4  # Triton's defaults
    num_stages: int = 3

    def run(self) -> None:
        """Launch the kernel; an empty grid launches nothing."""
        if 0 in self.grid:
            return
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)
