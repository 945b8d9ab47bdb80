"""Initial guesses of the Jacobi iteration, and the numbers the calibrated one carries.

One place for what `init` means, because three readers need the same answer: the segment
solver, the frontier solver and the profile's IGM. `zeros` and `z` need nothing but the block's
input; `calibrated` is x0 = offset + scale * z per block-order position and channel, fitted by
least squares on the profile's calibration pairs (z, x*) of that block. It is the only guess
measured to save passes on both MNIST models (`studies/inits/`): the per-position mean of x*
alone lowers the IGM but not the passes, z alone ignores what the block does on average; the
fitted line does both. Its numbers travel inside the schedule file (`Schedule.guesses`), under
the schedule's model fingerprint, so a guess fitted to other weights is refused with them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError


def _encode(a: torch.Tensor) -> str:
    """float32 little-endian, row-major, base64: compact and bit-exact in a JSON file."""
    return base64.b64encode(a.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


def _decode(text: str, shape: tuple[int, int], where: str) -> np.ndarray:
    try:
        a = np.frombuffer(base64.b64decode(text.encode(), validate=True), dtype="<f4")
    except (ValueError, TypeError):
        raise UserError(f"{where}: not base64 float32 data") from None
    if a.size != shape[0] * shape[1] or not np.isfinite(a).all():
        raise UserError(f"{where}: expected {shape[0]}x{shape[1]} finite float32 values")
    return a.reshape(shape)


@dataclass(frozen=True)
class CalibratedGuess:
    """x0 = offset + scale * z for one block, (T, D) each in block token order.

    Held as the file's base64 text so that schedules compare, hash and round-trip exactly;
    `tensors` decodes it where a solver needs it. `n`: calibration pairs it was fitted on."""

    shape: tuple[int, int]
    offset: str
    scale: str
    n: int

    @classmethod
    def fit(cls, x_star: torch.Tensor, z: torch.Tensor) -> "CalibratedGuess":
        """Per position and channel least squares x* ~ offset + scale * z over the batch (N, T, D)."""
        x_star, z = x_star.double(), z.double()
        mx, mz = x_star.mean(0), z.mean(0)
        var = (z - mz).pow(2).mean(0)
        scale = torch.where(var > 1e-12, ((x_star - mx) * (z - mz)).mean(0) / var.clamp_min(1e-12), 0.0)
        shape = tuple(int(s) for s in mx.shape)
        return cls(shape, _encode(mx - scale * mz), _encode(scale), int(x_star.shape[0]))

    def tensors(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale) as (T, D) tensors."""
        return tuple(torch.from_numpy(_decode(t, self.shape, "calibrated guess").copy()).to(device, dtype)
                     for t in (self.offset, self.scale))

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "offset": self.offset, "scale": self.scale, "n": self.n}

    @classmethod
    def from_dict(cls, d, where: str) -> "CalibratedGuess":
        """Validated on load, so a damaged file is a one-line error and not a wrong sample."""
        if not isinstance(d, dict) or set(d) != {"shape", "offset", "scale", "n"}:
            raise UserError(f"{where}: expected an object with shape, offset, scale and n")
        shape, n = d["shape"], d["n"]
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise UserError(f"{where}: 'shape' must be two positive integers [T, D], got {shape!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"{where}: 'n' must be a positive integer, got {n!r}")
        for key in ("offset", "scale"):
            if not isinstance(d[key], str):
                raise UserError(f"{where}: '{key}' must be base64 text")
            _decode(d[key], tuple(shape), f"{where}.{key}")
        return cls(tuple(shape), d["offset"], d["scale"], n)


def start(init: str, zs: torch.Tensor, s: int = 0, calibrated=None) -> torch.Tensor:
    """The initial guess of block-order tokens [s, s + L) whose input noise is zs (N, L, D).

    `calibrated`: the block's (offset, scale) tensors from `CalibratedGuess.tensors`. The caller
    sets the span's first token exact, whatever the guess, which is what keeps a full budget
    exact (`tarflow.solve.solve_segment`)."""
    if init == "z":
        return zs.clone()
    if init == "zeros":
        return torch.zeros_like(zs)
    if init == "calibrated":
        if calibrated is None:
            raise UserError("init 'calibrated' needs the fitted guess its schedule file carries "
                            "(a tuned schedule; built-in ones have none)")
        offset, scale = calibrated
        L = zs.shape[1]
        return offset[s:s + L] + scale[s:s + L] * zs
    raise UserError(f"unknown init {init!r}")
