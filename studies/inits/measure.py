"""Candidate initial guesses for GS-Jacobi, measured on both MNIST models (CPU, a few minutes).

Why a study and not a test: a guess only changes how many passes a block needs, never the
converged answer, so whether a guess belongs in the product is a measurement, kept here to be
re-run when a model or a candidate changes.

For each model the 256 calibration images go forward through the flow with their own labels
(as `tuner.measure.profile` does); every block gives z (its output) and x* (its exact sequential
inverse), in block token order. Images 64..255 *fit* the calibrated guesses (per-position mean of
x*, per-class mean, per-position least-squares x* ~ c + s z); images 0..63 (the profile's curve
images) *evaluate* every guess, so a calibrated guess is never scored on what it was fitted on.

Per block, guess and segment count (1 and 4):
  igm     the profile's IGM: one Jacobi step from the guess (previous segments at x*), spectral
          norm of the batch-mean residual to x*
  rms0    RMS of (guess - x*): how far the guess starts
  passes  plain Jacobi passes until max |x - x*| <= 1e-3 over each segment and the batch
          (the profile's passes-to-tolerance, the most any segment needs)
  exact   float64, full budget, tol 0, 2 images: max |x - x_sequential| (must be <= 1e-9)

Then the sampler itself (`tarflow.sampling.sample`, the product path) on fresh noise (seed 0,
batch 16, labels i mod 10), unguided and at guidance 1.5, for the inits the product has:
passes per block at the sampler's own stop (update <= tol) for tol 1e-3 and 3e-2 (the tol the
passes-optimised tunes ended on), 1 and 4 segments, and the pixel drift against sequential.
The calibrated guess there is fitted on all 256 calibration images under the same settings,
as the profile fits it.

Run from the repository root:  python studies/inits/measure.py [--out studies/inits]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import time
from pathlib import Path

import pandas as pd
import torch

from tarflow.checkpoint import load_checkpoint
from tarflow.guess import CalibratedGuess, start
from tarflow.sampling import BlockSolver, SamplerStats, make_noise, sample
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule
from tarflow.settings import SamplingSettings
from tarflow.solve import affine_inverse, segment_bounds, solve_segment, solve_sequential
from tuner.measure.profile import block_solutions, calibration_batch, calibration_labels, spectral

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"mnist (T=49)": ROOT / "studies/mnist/model.pth", "mnist_p2 (T=196)": ROOT / "studies/mnist_p2/model.pth"}
CALIB = ROOT / "studies/mnist/calibration.npz"
EVAL_N, EXACT_N, TOL = 64, 2, 1e-3
STOP = 1e-5  # curves stop once a pass moves nothing by more than this (checked: 1e-3 reached first)
SEGMENTS = (1, 4)
# (name, what it is, which issue candidate)
GUESSES = [
    ("zeros", "today: zeros, segment's first token exact", "today"),
    ("z", "today: the block's input noise z", "today"),
    ("mean", "per-position mean of x* over the fit images", "a"),
    ("class_mean", "per-class, per-position mean of x* (sample's own label)", "a"),
    ("mean_z", "(mean + z) / 2", "c"),
    ("calibrated", "per-position least squares x* ~ offset + scale * z (product: init calibrated)", "c"),
    ("z_scaled", "s * z, one scalar s per block by least squares", "c"),
    ("prev_last", "repeat the last solved token (first segment: z)", "b"),
    ("prev_row", "copy the row of tokens above (first segment: z)", "b"),
    ("prev_seg", "copy the previous segment's tokens (first segment: z)", "b"),
]
SETTINGS = SamplingSettings()


def fit(x_star, z, y, K: int) -> dict:
    """Calibrated statistics of one block from the fit images (all (T, D) or (K, T, D)); the
    calibrated line is the product's own fit (`tarflow.guess.CalibratedGuess`)."""
    mu = x_star.mean(0)
    cls = torch.stack([x_star[y == c].mean(0) if (y == c).any() else mu for c in range(K)]) if K and y is not None else None
    scal = float((x_star * z).sum() / z.pow(2).sum())
    cal = CalibratedGuess.fit(x_star, z)
    return {"mean": mu, "calibrated": cal.tensors(z.device, z.dtype), "guess": cal, "class_mean": cls,
            "z_scaled": scal}


def periodic(x_done, s: int, L: int, period: int):
    """Tokens s .. s+L-1 as a periodic copy of the last `period` solved tokens (< s)."""
    p = max(1, min(period, s))
    idx = torch.arange(s, s + L)
    return x_done[:, s - p + (idx - s) % p]


def guess(name: str, st: dict, z, y, x_done, s: int, e: int, W: int, L_prev: int):
    """The candidate's initial guess for block-order tokens [s, e); x_done holds tokens < s."""
    zs = z[:, s:e]
    if name == "zeros":
        return torch.zeros_like(zs)
    if name == "z" or (name.startswith("prev_") and s == 0):
        return zs.clone()
    if name == "mean":
        return st["mean"][s:e].expand_as(zs).clone()
    if name == "class_mean":
        return st["class_mean"][y][:, s:e].clone()
    if name == "mean_z":
        return 0.5 * (st["mean"][s:e] + zs)
    if name == "calibrated":
        return start("calibrated", zs, s, st["calibrated"])
    if name == "z_scaled":
        return st["z_scaled"] * zs
    period = {"prev_last": 1, "prev_row": W, "prev_seg": L_prev}[name]
    return periodic(x_done, s, e - s, period)


def full_guess(name, st, z, y, x_star, S: int, W: int):
    """The whole block's starting point as GS-Jacobi sees it: every segment's guess with the
    tokens before it at x* and its first token exact (what `solve_segment` does)."""
    g = torch.empty_like(z)
    bounds = segment_bounds(z.shape[1], S)
    for j, (s, e) in enumerate(bounds):
        L_prev = bounds[j - 1][1] - bounds[j - 1][0] if j else 1
        g[:, s:e] = guess(name, st, z, y, x_star, s, e, W, L_prev)
        g[:, s] = x_star[:, s]
    return g


@torch.no_grad()
def igm(block, name, st, z, y, x_star, S, W) -> tuple[float, float]:
    """(IGM, rms0) of a guess: one whole-block Jacobi step, batch-mean residual's spectral norm."""
    g = full_guess(name, st, z, y, x_star, S, W)
    a, b = block.transform_params(g, y)
    return spectral((affine_inverse(z, a, b) - x_star).mean(0)), float((g - x_star).pow(2).mean().sqrt())


@torch.no_grad()
def run_segments(block, k, name, st, z, y, S, W, tol, target=None):
    """GS-Jacobi on one block with the candidate guess through the real `solve_segment` (plain
    Jacobi, exact budget, stop once the update is <= tol). Returns (x, passes until
    max |x - target| <= TOL: the most any segment needed; None without a target)."""
    T = z.shape[1]
    solver = BlockSolver(block, y, z.shape[0], SETTINGS, z.device, block.proj_in.weight.dtype)
    x, carry, need = torch.empty_like(z), None, []
    bounds = segment_bounds(T, S)
    for j, (s, e) in enumerate(bounds):
        L_prev = bounds[j - 1][1] - bounds[j - 1][0] if j else 1
        g = guess(name, st, z, y, x, s, e, W, L_prev)
        log = []
        rec = None if target is None else (
            lambda it, new, s=s, e=e, log=log: log.append((it, float((new - target[:, s:e]).abs().amax()))))
        plan = BlockPlan(k, S, e - s, "zeros", tol)
        carry, _, _ = solve_segment(solver, z, x, s, e, plan, carry, e == T, record=rec, guess=g)
        hit = [it for it, err in log if err <= TOL]
        if target is not None and log and not hit:
            raise RuntimeError(f"block {k} {name} S={S} segment {j}: stopped before error {TOL}")
        need.append(hit[0] if hit else 0)
    return x, (max(need) if target is not None else None)


def exactness(model, k, name, st, z, y, S, W) -> float:
    """float64, tol 0, full budget: max |x - sequential| for one block and guess."""
    T = model.cfg.num_patches
    block = model.blocks[k]
    zx, yx = z[:EXACT_N], y[:EXACT_N]
    ref = solve_sequential(BlockSolver(block, yx, EXACT_N, SETTINGS, z.device, z.dtype), zx,
                           BlockPlan(k, T, 1), SamplerStats(T=T), 1)
    return float((run_segments(block, k, name, st, zx, yx, S, W, 0.0)[0] - ref).abs().max())


def measure_model(label: str, path: Path, log=print) -> list[dict]:
    """Every guess on every block of one model: IGM, rms0, passes to TOL, float64 exactness."""
    rows = {}
    for dtype in (torch.float32, torch.float64):
        model = load_checkpoint(path, dtype=dtype)
        cfg = model.cfg
        W, K = cfg.img_size // cfg.patch_size, cfg.num_classes
        x, y = calibration_batch(CALIB, None, 0, model)
        y, _ = calibration_labels(y, SETTINGS, model)
        for k, block, z, x_star in block_solutions(model, x, y, SETTINGS):
            st = fit(x_star[EVAL_N:], z[EVAL_N:], y[EVAL_N:], K)
            ze, ye, xe = z[:EVAL_N], y[:EVAL_N], x_star[:EVAL_N]
            for (name, _, cand), S in ((g, S) for g in GUESSES for S in SEGMENTS):
                key = (label, k, name, S)
                if dtype == torch.float32:
                    g, r0 = igm(block, name, st, ze, ye, xe, S, W)
                    p = run_segments(block, k, name, st, ze, ye, S, W, STOP, target=xe)[1]
                    rows[key] = {"model": label, "block": k, "sampling_step": cfg.num_blocks - 1 - k, "init": name,
                                 "candidate": cand, "segments": S, "igm": g, "rms0": r0, "passes": p}
                else:
                    rows[key]["exact"] = exactness(model, k, name, st, z, y, S, W)
            log(f"{label} {str(dtype).removeprefix('torch.')} block {k} done")
    return list(rows.values())


def calibrated_schedule(model, spec: str, settings, x, y) -> Schedule:
    """A built-in Jacobi schedule with every block's init calibrated, fitted as the profile does."""
    base = builtin_schedule(spec, model)
    guesses = {k: CalibratedGuess.fit(xs, z) for k, _, z, xs in block_solutions(model, x, y, settings)}
    return Schedule(tuple(replace(p, init="calibrated") for p in base.plans), base.fingerprint,
                    spec.replace("zeros", "calibrated"), guesses=guesses)


@torch.no_grad()
def sampler_rows(label: str, path: Path, log=print) -> list[dict]:
    """The product sampler with each product init: passes per block and drift vs sequential."""
    model = load_checkpoint(path)
    x, y = calibration_batch(CALIB, None, 0, model)
    noise, rows = make_noise(16, model, seed=0), []
    for settings in (SamplingSettings(), SamplingSettings(guidance=1.5)):
        lab = settings.make_labels(16, model)
        ref, _ = sample(model, noise, builtin_schedule("sequential", model), labels=lab, settings=settings)
        for S, tol in ((S, tol) for S in SEGMENTS for tol in (1e-3, 3e-2)):
            for init in ("zeros", "z", "calibrated"):
                spec = f"jacobi:segments={S},init={'zeros' if init == 'calibrated' else init},tol={tol}"
                sched = calibrated_schedule(model, spec, settings, x, y) if init == "calibrated" \
                    else builtin_schedule(spec, model)
                img, stats = sample(model, noise, sched, labels=lab, settings=settings)
                drift = ((img - ref) * 127.5).pow(2).flatten(1).mean(1).sqrt()
                rows.append({"model": label, "guidance": settings.guidance, "segments": S, "tol": tol, "init": init,
                             "passes_per_block": [sum(i) for i in stats.iters], "passes": stats.passes,
                             "drift_mean": float(drift.mean()), "drift_max": float(drift.max())})
        log(f"{label} sampler guidance {settings.guidance} done")
    return rows


def tables(df: pd.DataFrame) -> str:
    """Markdown: per model and segment count, passes to TOL and IGM per block and guess."""
    out = []
    for (label, S), d in df.groupby(["model", "segments"], sort=False):
        steps = sorted(d.sampling_step.unique())
        head = " | ".join(f"block {int(d[d.sampling_step == t].block.iloc[0])}" for t in steps)
        out += [f"\n{label}, {S} segment(s): passes to {TOL} (IGM), blocks in sampling order\n",
                f"| init | cand. | {head} | passes, sum |", "|---|---|" + "---|" * (len(steps) + 1)]
        for name, _, cand in GUESSES:
            r = d[d.init == name].set_index("sampling_step")
            cells = " | ".join(f"{r.passes[t]:.0f} ({r.igm[t]:.3g})" for t in steps)
            out.append(f"| {name} | {cand} | {cells} | {r.passes.sum():.0f} |")
    return "\n".join(out)


def sampler_table(df: pd.DataFrame) -> str:
    out = ["\nsampler, batch 16, seed 0: passes per block in sampling order (total), drift mean / max per 255\n",
           "| model | guidance | segments | tol | zeros | z | calibrated |", "|---|---|---|---|---|---|---|"]
    for (label, g, S, tol), d in df.groupby(["model", "guidance", "segments", "tol"], sort=False):
        cells = " | ".join(f"{r.passes_per_block} ({r.passes}) {r.drift_mean:.3f}/{r.drift_max:.2f}"
                           for r in d.set_index("init").loc[["zeros", "z", "calibrated"]].itertuples())
        out.append(f"| {label} | {g} | {S} | {tol:g} | {cells} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "studies/inits"), help="folder for results.csv and sampler.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    df = pd.DataFrame([r for label, path in MODELS.items() for r in measure_model(label, path)])
    sd = pd.DataFrame([r for label, path in MODELS.items() for r in sampler_rows(label, path)])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "results.csv", index=False)
    sd.to_csv(Path(args.out) / "sampler.csv", index=False)
    print(tables(df) + "\n" + sampler_table(sd))
    worst = df.exact.max()
    print(f"\nexactness: max |x - x_seq| over every block, guess and segment count = {worst:.2e} "
          f"({'ok' if worst <= 1e-9 else 'FAILED'} at 1e-9); {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
