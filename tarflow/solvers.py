"""Which transformer step runs a schedule: a runtime choice, never part of the schedule file.

    eager    BlockSolver: the step launched from Python, token by token (the CPU default)
    static   StaticSolver without graphs: static buffers, a device-side position
    graphs   StaticSolver with one CUDA graph captured per span length (the CUDA default;
             on a CPU it runs as `static`, graphs being a CUDA feature)
    compile  graphs, with the step compiled by torch.compile first

All four give the same samples (tests/test_solvers.py: float64 <= 1e-9). `SolverChoice` is the
factory `sample(..., solvers=...)` takes. A capture or compilation that fails on a user's GPU
must not stop them: `sample` asks the choice to `fall_back`, which switches to eager for the
rest of the process, reports the reason once through `on_fallback`, and the sample is redone
from its start. `record()` says what was asked for and what ran (provenance, summaries).
"""

from __future__ import annotations

from typing import Callable

from .errors import UserError
from .graphs import StaticSolvers
from .sampling import BlockSolver

SOLVER_NAMES = ("auto", "eager", "static", "graphs", "compile")


def default_solver(device) -> str:
    """eager on a CPU (graphs are a CUDA feature), graphs on CUDA."""
    return "graphs" if str(device).startswith("cuda") else "eager"


class SolverChoice:
    """A solver factory by name, with a one-way fallback to eager (see the module docstring)."""

    def __init__(self, name: str = "auto", device="cpu", on_fallback: Callable[[str], None] | None = None):
        if name not in SOLVER_NAMES:
            raise UserError(f"solver must be one of {', '.join(SOLVER_NAMES)}, got {name!r}", setting="solver")
        self.requested = name
        self.name = default_solver(device) if name == "auto" else name
        self.used = self.name
        self.fallback: str | None = None  # why the requested solver was given up, if it was
        self.on_fallback = on_fallback
        self._factory = self._build(self.name)

    @staticmethod
    def _build(name: str):
        if name == "eager":
            return BlockSolver
        return StaticSolvers(graphs=name in ("graphs", "compile"), compile=name == "compile")

    def __call__(self, block, labels, n: int, settings, device, dtype):
        return self._factory(block, labels, n, settings, device, dtype)

    def fall_back(self, error: BaseException) -> bool:
        """Give up the static solver after `error`; False when already eager (the error is real)."""
        if self.used == "eager" or isinstance(error, (UserError, KeyboardInterrupt)):
            return False
        self.used, self._factory = "eager", BlockSolver
        self.fallback = f"{self.name} solver failed ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); ran eager"
        if self.on_fallback is not None:
            self.on_fallback(self.fallback)
        return True

    def record(self) -> dict:
        return {"requested": self.requested, "used": self.used, "fallback": self.fallback}
