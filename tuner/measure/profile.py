"""Per-block difficulty of the GS-Jacobi inverse, measured on a calibration batch.

One forward pass gives every block's output z; the block's exact sequential inverse of z under
the sampling settings (guidance, precision) gives x*, the exact solution of the triangular
system that sampling solves in that block (without guidance, x* is the block's input). A
class-conditional model sees each real image with its own label (`calibration_labels`): x* is
only a point sampling reaches if the image is conditioned on its class. From them:

* CRM (convergence ranking metric, arXiv 2505.12849):
  ||mean_batch(alpha * x_in)||_2 * ||W_s||_2 + ||W_u||_2, alpha = exp(-log-scale), ||.||_2 the
  spectral norm, W_s / W_u the log-scale / shift halves of the output projection weight.
* IGM (initial guessing metric) per initial guess: one Jacobi step from the guess, residual to
  x*, spectral norm of its batch mean (T x D matrix).
* The calibrated guess (`tarflow.guess.CalibratedGuess`): per position and channel the least
  squares line x* ~ offset + scale * z over all calibration images; a schedule whose init is
  `calibrated` carries it. IGM and curves score it on the first `curve_n` of those same
  images, in-sample: against held-out images (`studies/inits/`) the passes to 1e-3 came out
  the same on both MNIST models except the patch-2 tough block at 4 segments (22 here, 24
  held out). `best_init` stays the IGM-best of the guesses that need no fitted numbers.
* Measured convergence: the block's real GS-Jacobi iteration from each guess for several segment
  counts, error max|x - x*| over the segment and batch after every pass, plus Anderson-mixed
  iteration (column `anderson` = history m, 0 = plain) at one segment. This is the search's
  cost model (iterations needed per tolerance).

Tables carry both `block` (forward index) and `sampling_step` (0 = first block run when sampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tarflow.checkpoint import atomic_write_text
from tarflow.data import load_images, to_model_space
from tarflow.errors import UserError
from tarflow.guess import CalibratedGuess, start
from tarflow.model import TarFlow
from tarflow.sampling import BlockSolver, SamplerStats, state_dtype
from tarflow.solve import affine_inverse, segment_bounds, solve_segment, solve_sequential
from tarflow.schedule import FITTED_INITS, INITS, BlockPlan
from tarflow.settings import SamplingSettings

CURVE_SEGMENTS = (1, 2, 4, 8)  # plus T; only those <= T
ANDERSON_CURVES = (2, 3)  # Anderson histories measured at one segment from the IGM-best guess
TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4)
CURVE_STOP = 1e-6  # a curve ends once a pass moves no value by more than this (float32 noise)


@dataclass
class Profile:
    blocks: pd.DataFrame  # one row per block, forward order
    curves: pd.DataFrame  # long: block, sampling_step, segments, init, anderson, segment, iteration, error, update
    iters_to_tol: pd.DataFrame  # block, segments, init, anderson, tol, iters (max over segments)
    meta: dict
    guesses: dict = field(default_factory=dict)  # forward block -> CalibratedGuess (init calibrated)

    def save(self, out: Path) -> None:
        out = Path(out)
        atomic_write_text(out / "profile.csv", self.blocks.to_csv(index=False))
        atomic_write_text(out / "convergence.csv", self.curves.to_csv(index=False))
        atomic_write_text(out / "iters_to_tol.csv", self.iters_to_tol.to_csv(index=False))
        doc = {"meta": self.meta, "order": "rows in forward block order; sampling_step = B-1-block",
               "blocks": self.blocks.to_dict(orient="records"),
               "iters_to_tol": self.iters_to_tol.to_dict(orient="records"),
               "convergence": self.curves.to_dict(orient="list"),
               "guesses": {str(k): g.to_dict() for k, g in self.guesses.items()}}
        atomic_write_text(out / "profile.json", json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, out: Path) -> "Profile":
        out = Path(out)
        try:
            doc = json.loads((out / "profile.json").read_text())
            curves, need = pd.DataFrame(doc["convergence"]), pd.DataFrame(doc["iters_to_tol"])
            for table in (curves, need):  # profiles written before Anderson curves existed
                if "anderson" not in table:
                    table["anderson"] = 0
            guesses = {int(k): CalibratedGuess.from_dict(g, f"{out}/profile.json guesses.{k}")
                       for k, g in doc.get("guesses", {}).items()}  # none in profiles before them
            return cls(pd.DataFrame(doc["blocks"]), curves, need, doc["meta"], guesses)
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise UserError(f"cannot read profile in {out}: {e}") from None

    def iters_needed(self, block: int, segments: int, init: str, tol: float, anderson: int = 0) -> int:
        """Passes per segment the measured curves needed to reach `tol` (segment length if never)."""
        c = self.curves[(self.curves.block == block) & (self.curves.segments == segments)
                        & (self.curves.init == init) & (self.curves.anderson == anderson)]
        if c.empty:
            return -(-int(self.meta["T"]) // segments)
        need = []
        for _, seg in c.groupby("segment"):
            hit = seg[seg.error <= tol]
            need.append(int(hit.iteration.min()) if len(hit) else int(seg.iteration.max()))
        return max(need)


PROFILE_N = 256  # calibration images a profile uses by default (all of a smaller set)


def calibration_batch(data, n: int | None, seed: int, model: TarFlow):
    """n images from `data` (all, in file order, when it holds exactly n; n=None: all of them up
    to PROFILE_N), in model space, and their labels (None when the set has none)."""
    cfg = model.cfg
    u8, labels = load_images(data, size=cfg.img_size)
    if u8.shape[1:] != (cfg.in_channels, cfg.img_size, cfg.img_size):
        raise UserError(f"{data}: images are {tuple(u8.shape[1:])}, the model expects "
                        f"{(cfg.in_channels, cfg.img_size, cfg.img_size)}")
    n = min(PROFILE_N, len(u8)) if n is None else n
    if n > len(u8):
        raise UserError(f"{data} holds {len(u8)} images, fewer than the n={n} asked for")
    idx = np.arange(n) if n == len(u8) else np.sort(np.random.default_rng(seed).choice(len(u8), n, replace=False))
    x = to_model_space(u8[idx]).to(model.var.device, model.var.dtype)
    y = torch.from_numpy(labels[idx]).to(x.device) if labels is not None else None
    return x, y


OWN_LABELS = "own (each image's calibration label)"
UNCOND = "unconditional (mean class embedding)"


def calibration_labels(y, settings: SamplingSettings, model: TarFlow):
    """The labels the calibration images go through the flow with, and the words profile.json
    records for them: (labels or None, description).

    x* is a real image's forward pass, and a real image of a class-conditional model belongs to
    its own class: conditioned on any other label it follows a trajectory no sample follows. So
    a labelled set is profiled with its own labels whatever the label policy (the policy says
    which classes *samples* get), and unconditionally only when the samples are unconditional
    (`labels="uncond"`) or the set has no labels to give."""
    K = model.cfg.num_classes
    if not K:
        return None, "none (unconditional model)"
    if settings.labels == "uncond":
        return None, f"{UNCOND}, as the label policy asks"
    if y is None:
        return None, f"{UNCOND}: the calibration set has no labels"
    bad = y[(y < 0) | (y >= K)]
    if len(bad):
        raise UserError(f"calibration label {int(bad[0])} is not a class of this model (0..{K - 1}); "
                        "profile with labels=uncond, or relabel the data", setting="labels")
    return y, OWN_LABELS


def spectral(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m.double(), ord=2))


def initial_guess(init: str, z, calibrated=None):
    """The Jacobi starting point for a whole block as the solvers make it: `init` with token 0 exact."""
    x0 = start(init, z, 0, calibrated)
    x0[:, 0] = z[:, 0]
    return x0


@torch.no_grad()
def block_metrics(block, x_star, z, y, calibrated=None) -> dict:
    """CRM and IGM of one block; x_star, z in block token order; `calibrated` (offset, scale)."""
    a, _ = block.transform_params(x_star, y)
    D = x_star.shape[-1]
    W = block.proj_out.weight
    W_s, W_u = (W[:D], W[D:]) if block.nvp else (torch.zeros_like(W), W)
    crm = spectral((torch.exp(-a) * x_star).mean(0)) * spectral(W_s) + spectral(W_u)
    row = {"crm": crm}
    for init in INITS:
        a0, b0 = block.transform_params(initial_guess(init, z, calibrated), y)
        x1 = affine_inverse(z, a0, b0)
        row[f"igm_{init}"] = spectral((x1 - x_star).mean(0))
    return row


@torch.no_grad()
def convergence_curves(block, k, x_star, z, y, configs, B, settings: SamplingSettings,
                       calibrated=None) -> list[dict]:
    """Run the real GS-Jacobi solver on this block for each (segments, init, anderson) config,
    logging the error to x* after every pass."""
    rows = []
    T = z.shape[1]
    for S, init, anderson in configs:
        solver = BlockSolver(block, y, z.shape[0], settings, z.device, block.proj_in.weight.dtype)
        x = torch.empty_like(z)
        carry = None
        for j, (s, e) in enumerate(segment_bounds(T, S)):
            L = e - s
            target = x_star[:, s:e]
            log = []
            plan = BlockPlan(k, S, L, init, CURVE_STOP, anderson)
            prev = {"x": None}

            def record(it, new):
                err = float((new - target).abs().amax())
                upd = float((new - prev["x"]).abs().amax()) if prev["x"] is not None else float("nan")
                prev["x"] = new
                log.append((it, err, upd))

            carry, _, _ = solve_segment(solver, z, x, s, e, plan, carry, last=e == T, record=record,
                                        calibrated=calibrated)
            if not log:  # a one-token last segment is exact with no pass
                log.append((0, float((x[:, s:e] - target).abs().amax()), 0.0))
            for it, err, upd in log:
                rows.append({"block": k, "sampling_step": B - 1 - k, "segments": S, "init": init,
                             "anderson": anderson, "segment": j, "seg_len": L, "iteration": it,
                             "error": err, "update": upd})
    return rows


@torch.no_grad()
def block_solutions(model: TarFlow, x, y, settings: SamplingSettings):
    """Per block, forward order: (k, block, z, x*) in block token order, z the block's output in
    the forward pass of x with labels y, x* the exact sequential inverse of z under `settings`
    (without guidance: the block's input in that same forward pass)."""
    wdtype = model.var.dtype
    T = model.cfg.num_patches
    _, outputs, _ = model(x.to(wdtype), y)
    for k, block in enumerate(model.blocks):
        z = block.permute(outputs[k]).to(state_dtype(wdtype))
        exact = BlockSolver(block, y, len(z), settings, z.device, wdtype)
        yield k, block, z, solve_sequential(exact, z, BlockPlan(k, T, 1), SamplerStats(T=T), 1)


def run_profile(model: TarFlow, x, y, *, settings: SamplingSettings = SamplingSettings(),
                curve_n: int = 64, progress=None, labels: str | None = None) -> Profile:
    """Profile every block under the sampling settings. x: calibration images in model space;
    y: their labels, or None (unconditional: the mean class embedding); `labels`: how profile.json
    describes y (see `calibration_labels`), by default "given" or unconditional."""
    cfg = model.cfg
    B, T = cfg.num_blocks, cfg.num_patches
    wdtype = model.var.dtype
    rows, curves, guesses = [], [], {}
    task = progress.add_task("profile", total=B) if progress else None
    m = min(curve_n, len(x))
    for k, block, z, x_star in block_solutions(model, x, y, settings):
        guesses[k] = CalibratedGuess.fit(x_star, z)
        cal = guesses[k].tensors(z.device, z.dtype)
        row = {"block": k, "sampling_step": B - 1 - k} | block_metrics(
            block, x_star.to(wdtype), z.to(wdtype), y, tuple(t.to(wdtype) for t in cal))
        rows.append(row)
        best = min((i for i in INITS if i not in FITTED_INITS), key=lambda i: row[f"igm_{i}"])
        configs = [(S, init, 0) for S in sorted({s for s in CURVE_SEGMENTS if s <= T} | {T})
                   for init in INITS] + [(1, best, m_) for m_ in ANDERSON_CURVES]
        curves += convergence_curves(block, k, x_star[:m], z[:m], None if y is None else y[:m],
                                     configs, B, settings, cal)
        if progress:
            progress.advance(task)
    table = pd.DataFrame(rows)
    table["crm_share"] = 100 * table.crm / table.crm.sum()
    # best_init: a guess any schedule can use, so seeds built from it need no fitted numbers
    igm_cols = [f"igm_{i}" for i in INITS if i not in FITTED_INITS]
    table["best_init"] = table[igm_cols].idxmin(axis=1).str.removeprefix("igm_")
    curves = pd.DataFrame(curves)
    if labels is None:
        labels = "given" if y is not None else UNCOND if cfg.num_classes else "none (unconditional model)"
    prof = Profile(table, curves, pd.DataFrame(), {"T": T, "num_blocks": B, "n": len(x), "curve_n": m,
                                                  "labels": labels,
                                                  "dtype": str(wdtype).removeprefix("torch."),
                                                  "sampling": settings.to_dict(),
                                                  "fingerprint": model.fingerprint}, guesses)
    need = [{"block": k, "sampling_step": B - 1 - k, "segments": S, "init": init, "anderson": m_, "tol": tol,
             "iters": prof.iters_needed(k, S, init, tol, m_)}
            for (k, S, init, m_), _ in curves.groupby(["block", "segments", "init", "anderson"]) for tol in TOLERANCES]
    prof.iters_to_tol = pd.DataFrame(need)
    return prof
