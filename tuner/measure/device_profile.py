"""Device profiles: the measured time of one transformer pass as a function of how many tokens it
runs, per block, on one device at one batch. With one, `tune --objective cost:FILE` searches a
schedule for that device from any machine: a schedule's modelled latency is the sum, over the
passes it ran, of the profiled time of a pass of that width (the sampler counts passes by
width, see SamplerStats.calls)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tarflow.checkpoint import atomic_write_text, read_json
from tarflow.errors import UserError
from tarflow.sampling import make_noise, state_dtype
from tarflow.settings import SamplingSettings
from tarflow.solvers import SolverChoice

from tuner.measure.timing import device_info, timed

DEVICE_PROFILE_VERSION = 1


@dataclass
class DeviceProfile:
    device: dict  # device_info of the machine measured
    batch: int
    guided: bool  # guidance doubles the rows of every pass
    dtype: str
    model_sha256: str
    widths: list[int]
    seconds: dict[str, list[float]]  # forward block -> median seconds of a pass of each width
    version: int = DEVICE_PROFILE_VERSION
    solver: dict | None = None  # the transformer step timed (SolverChoice.record); None: eager, older files

    def pass_seconds(self, block: int, width: int) -> float:
        """Profiled time of one pass of `width` tokens in `block` (linear between measured widths)."""
        return float(np.interp(width, self.widths, self.seconds[str(block)]))

    def cost(self, calls: list[dict], blocks: list[int]) -> float:
        """Modelled seconds of one sampling run from its per-block pass counts by width."""
        return sum(n * self.pass_seconds(k, int(w)) for k, c in zip(blocks, calls) for w, n in c.items())

    def check_fits(self, model, batch: int, settings: SamplingSettings) -> None:
        """A profile measured for another model, batch or guidance models another workload."""
        wrong = []
        if self.model_sha256 != model.fingerprint["weights_sha256"]:
            wrong.append("it was measured on other weights")
        if self.batch != batch:
            wrong.append(f"it was measured at batch {self.batch}, not {batch}")
        if self.guided != settings.guided:
            wrong.append(f"it was measured {'with' if self.guided else 'without'} guidance")
        if len(self.seconds) != model.cfg.num_blocks:
            wrong.append(f"it has {len(self.seconds)} blocks, the model {model.cfg.num_blocks}")
        if wrong:
            raise UserError(f"device profile does not fit this run: {'; '.join(wrong)}")

    def save(self, path) -> None:
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "DeviceProfile":
        path = Path(path)
        d = read_json(path, "a readable device profile")
        if not isinstance(d, dict) or d.get("version") != DEVICE_PROFILE_VERSION:
            raise UserError(f"{path}: not a device profile of version {DEVICE_PROFILE_VERSION}")
        try:
            prof = cls(**d)
            ok = all(len(v) == len(prof.widths) and all(s > 0 for s in v) for v in prof.seconds.values())
        except TypeError as e:
            raise UserError(f"{path}: not a valid device profile ({e})") from None
        if not ok or prof.widths != sorted(prof.widths) or not prof.widths:
            raise UserError(f"{path}: device profile needs increasing widths and one positive time per width")
        return prof


def pass_widths(T: int) -> list[int]:
    """Widths measured: powers of two below T, and T - 1 (the widest pass a block runs)."""
    w = [1]
    while w[-1] * 2 < T - 1:
        w.append(w[-1] * 2)
    return w + [T - 1] if w[-1] != T - 1 else w


@torch.no_grad()
def measure(model, *, batch: int, settings: SamplingSettings, device, repeats: int = 5,
            progress=None, solvers=None) -> DeviceProfile:
    """Time one pass of each width in each block (median of `repeats` after warm-up). A pass
    is timed at two positions, the start and the end of the sequence, and the two averaged: its
    attention reads the keys before it, so its cost depends a little on where it runs."""
    cfg = model.cfg
    T = cfg.num_patches
    widths = pass_widths(T)
    dtype = next(model.parameters()).dtype
    labels = settings.make_labels(batch, model, 0)
    labels = None if labels is None else labels.to(device)
    x = make_noise(batch, model, 0).to(device, dtype)
    choice = solvers or SolverChoice("eager", device)
    xs = x.to(state_dtype(dtype))  # the static solvers take the sampler's iterates

    def solver(block):
        return choice(block, labels, batch, settings, device, dtype)

    warm = solver(model.blocks[0])
    for _ in range(3 * repeats):  # the first calls of a process pay one-off costs: not a pass's time
        timed(lambda: warm.params(xs[:, :T - 1], 0), device)
        timed(lambda: warm.params(xs[:, :1], 0), device)
    seconds = {}
    for k, block in enumerate(model.blocks):
        try:
            seconds[str(k)] = _block_row(solver(block), xs, widths, repeats, device, progress)
        except Exception as e:  # a graph capture or compilation that fails: time eager instead
            if not choice.fall_back(e):
                raise
            seconds[str(k)] = _block_row(solver(block), xs, widths, repeats, device, None)
    return DeviceProfile(device=device_info(device), batch=batch, guided=settings.guided, dtype=str(dtype),
                         model_sha256=model.fingerprint["weights_sha256"], widths=widths, seconds=seconds,
                         solver=choice.record())


def _block_row(solver, x, widths: list[int], repeats: int, device, progress) -> list[float]:
    """Median seconds of one pass of each width in one block, at the sequence's start and end."""
    T, row = x.shape[1], []
    for L in widths:
        runs = []
        for start in (0, T - L):
            for r in range(repeats + 1):
                _, s = timed(lambda: solver.params(x[:, start:start + L], start), device)
                if r:
                    runs.append(s)
        row.append(float(np.median(runs)))
        if progress is not None:
            progress()
    return row
