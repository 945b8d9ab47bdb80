"""`fid` and `fid-ref`: FID of samples or of a schedule, reference statistics; the lines they print."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from tarflow.errors import UserError
from tuner.bundled import DEFAULT_CKPT
from tuner.cli.app import app
from tuner.cli.options import (ensure_writable, load_model, model_command,
                               recorded_sampling, resolve_device, settings_for, solver_options, user_errors)


@model_command(app)
@solver_options
def fid(
    samples: Optional[Path] = typer.Argument(
        None, help="samples .npz (x: model-space floats or uint8) or image folder; "
                   "omit to sample from --checkpoint with --schedule"),
    checkpoint: Optional[Path] = typer.Option(None, help="TarFlow .pth (default: bundled MNIST)"),
    schedule: str = typer.Option("sequential", help="schedule JSON file or built-in name"),
    n: int = typer.Option(1000, min=2, help="samples to draw (ignored with a samples file)"),
    seed: int = typer.Option(0, help="noise seed"),
    force: bool = typer.Option(False, help="run a schedule made for another model"),
    extractor: Optional[str] = typer.Option(None, help="mnist-cnn (fast, 28x28 grey only) or inception "
                                            "[default: mnist-cnn for 28x28 grey images, else inception]"),
    extractor_weights: Optional[Path] = typer.Option(
        None, help="weights file for the extractor (inception: TorchScript; env "
                   "TARFLOW_TUNER_INCEPTION also works)"),
    ref: Optional[Path] = typer.Option(None, help="reference statistics .npz (default: committed "
                                                  "MNIST test statistics for the extractor)"),
    noise_floor: bool = typer.Option(False, help="also FID of the sequential sampler over 3 seeds"),
    tolerance: Optional[float] = typer.Option(None, help="FID tolerance to check against the "
                                                         "noise floor (implies --noise-floor)"),
    batch: int = typer.Option(500, min=1, help="sampling batch size"),
    device: str = "auto",
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead"),
    workers: int = typer.Option(1, min=1, help="split the sampling over this many processes (torchrun: "
                                "NCCL on GPUs, gloo on CPU); the FID equals one process's"),
    sampling=None, geometry=None, solver=None,
):
    """FID (extractor id and n always shown); with a schedule, a paired proxy vs sequential."""
    import json

    from tuner.quality.distributed import init_ranks, launch
    from tuner.quality.fid_run import fid_command

    if samples is not None and not samples.exists():
        raise UserError(f"samples not found: {samples}")
    if workers > 1 and samples is not None:
        raise UserError("--workers splits sampling from --checkpoint; a samples file is read by one process")
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(launch(workers))
    ckpt = checkpoint
    if ckpt is None and (samples is None or noise_floor or tolerance is not None):
        ckpt = DEFAULT_CKPT
    dev = resolve_device(device)
    ranks = init_ranks(dev)
    model, settings = None, None
    if ckpt is not None:
        recorded = recorded_sampling([schedule]) if samples is None else {}
        model = load_model(ckpt, geometry, dev, sampling.dtype_for(recorded.get(schedule)))
        settings = settings_for(sampling, model, recorded)
    result = fid_command(samples=samples, model=model, checkpoint=ckpt, schedule=schedule, n=n,
                         seed=seed, extractor=extractor, ref=ref, weights=extractor_weights,
                         floor=noise_floor, tolerance=tolerance, settings=settings, force=force,
                         batch=batch, device=dev, progress=not json_out and sys.stderr.isatty(), ranks=ranks,
                         solvers=solver.choice(dev))
    ranks.close()
    if result is None:  # another rank than 0 of a --workers run: rank 0 reports
        return
    for line in [json.dumps(result, indent=2, sort_keys=True)] if json_out else format_fid(result):
        typer.echo(line)


@app.command("fid-ref")
@user_errors
def fid_ref(
    data: Path = typer.Option(..., help="images: npz (x_test / x_train / x) or a folder (class sub-folders allowed)"),
    out: Path = typer.Option(..., help="reference statistics .npz to write (never replaced)"),
    extractor: str = typer.Option("inception", help="inception or mnist-cnn"),
    n: Optional[int] = typer.Option(None, help="images to use (random subset, seed 0) [default: all]"),
    split: str = typer.Option("test", help="npz split: test or train (or an array name)"),
    size: Optional[int] = typer.Option(None, help="folder images: centre crop, then resize to this side "
                                       "(use the model's image size)"),
    extractor_weights: Optional[Path] = typer.Option(None, help="weights file for the extractor"),
    device: str = "auto",
):
    """Reference statistics for FID (mean and covariance of features) with their metadata."""
    from tuner.quality.fid_run import fid_ref_command

    ensure_writable(out)
    ref = fid_ref_command(data=data, extractor=extractor, out=out, n=n, split=split, size=size,
                          device=resolve_device(device), weights=extractor_weights,
                          progress=sys.stderr.isatty())
    typer.echo(f"wrote {out}: {ref.describe()}, images {'x'.join(map(str, ref.meta['image_shape']))}")


def inception_note(images: int) -> None:
    from tuner.quality.extractors import INCEPTION_CPU_S

    typer.echo(f"note: Inception features on this CPU cost ~{INCEPTION_CPU_S:.2f} s/image: about "
               f"{images * INCEPTION_CPU_S / 60:.0f} min for {images} images in this run", err=True)


def format_fid(r: dict) -> list[str]:
    """Terminal lines for a `fid_command` result; every FID names its extractor and n."""
    ref = r["ref"]
    lines = [f"FID {r['fid']:.4g} ({r['extractor']}, n={r['n']}) against "
             f"{Path(r['ref_path']).name} ({ref.get('source', '?')} {ref.get('split', '?')}, "
             f"n={ref['n']})"]
    src = r.get("source", {})
    if "schedule" in src:
        lines.append(f"  samples: {src['schedule']}, seed {src['seed']}, labels {src['sampling']['labels']}, "
                     f"sampled in {src['sampling_seconds']:.1f} s")
    if "proxy" in r:
        p = r["proxy"]
        lines.append(f"paired proxy vs sequential (same noise, n={p['n']}): pixel RMSE mean "
                     f"{p['rmse_mean']:.4g} max {p['rmse_max']:.4g} (0-255); feature L2 mean "
                     f"{p['feat_mean']:.4g} max {p['feat_max']:.4g} (spread {p['feat_spread']:.4g}, "
                     f"{p['extractor']})"
                     + (f"; {p['nonfinite']} non-finite samples" if p["nonfinite"] else ""))
    if "noise_floor" in r:
        f = r["noise_floor"]
        lines.append(f"noise floor (sequential, seeds {','.join(map(str, f['seeds']))}): FID "
                     f"{f['mean']:.4g} ± {f['std']:.3g} ({f['extractor']}, n={f['n']}); "
                     f"resolves differences >= {f['resolution']:.3g}")
    if r.get("tolerance_warning"):
        lines.append(f"warning: {r['tolerance_warning']}")
    return lines
