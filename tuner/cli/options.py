"""Command-line plumbing shared by every command: one-line errors, the shared option groups
(sampling settings, checkpoint geometry), and how given options meet what a schedule recorded."""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from tarflow.errors import UserError

def user_errors(fn):
    """Bad input -> one line on stderr and exit code 2, never a traceback. A study storage that
    stayed away past --storage-retry -> one line and its own exit code (3), so a scheduler can
    tell "rerun with --resume later" from "fix the command"."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {as_flags(e)}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except BaseException as e:
            outage = sys.modules.get("tuner.search.outage")  # loaded by whatever could raise it
            if outage is None or not isinstance(e, outage.StorageGone):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(outage.EXIT_CODE) from None
    return wrapper


FLAG_OF = {"num_classes": "--classes", "denoise_std": "--noise-std"}  # where a flag is not the setting's name


def as_flags(e: UserError) -> str:
    """The library names its settings (`img_size`, `force=True`); on the command line the user
    typed flags, so the settings an error is about (`e.setting`, comma-separated) are shown as
    their flags (`--img-size`, `--force`)."""
    text = str(e)
    for name in filter(None, (s.strip() for s in (getattr(e, "setting", None) or "").split(","))):
        flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(=True)?(?![\w])", flag, text)
    return text


def _inject(group: str, params: list[inspect.Parameter], build):
    """Add a shared group of options to a command's signature; the command receives them
    as one object (keyword `group`). One definition serves every command."""
    def deco(fn):
        sig = inspect.signature(fn)
        base = [p for p in sig.parameters.values() if p.name != group]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            kwargs[group] = build(**{p.name: kwargs.pop(p.name) for p in params})
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=base + params)
        wrapper.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != group} | {
            p.name: p.annotation for p in params}
        return wrapper
    return deco


def _opt(name: str, annotation, option):
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


SAMPLING_OPTIONS = [
    _opt("labels", Optional[str], typer.Option(
        None, help="class labels: balanced (i mod classes), random, uncond, or a comma list [default: balanced]")),
    _opt("guidance", Optional[float], typer.Option(
        None, help="classifier-free guidance w (0 = off) [default: 0]")),
    _opt("guidance_anneal", Optional[bool], typer.Option(
        None, "--guidance-anneal/--no-guidance-anneal", help="grow w linearly over tokens [default: off]")),
    _opt("attn_temp", Optional[float], typer.Option(
        None, help="attention temperature of the unconditional pass [default: 1]")),
    _opt("denoise", Optional[bool], typer.Option(
        None, "--denoise/--no-denoise", help="one score step removing the training noise [default: off]")),
    _opt("noise_std", Optional[float], typer.Option(
        None, help="noise std of --denoise [default: the checkpoint's training noise]")),
    _opt("dtype", Optional[str], typer.Option(
        None, help="float32, float64, bfloat16 or float16 (half: transformer and K/V only) [default: float32]")),
]
GEOMETRY_OPTIONS = [
    _opt("img_size", Optional[int], typer.Option(None, help="image side (default: sidecar, file name or inferred)")),
    _opt("patch_size", Optional[int], typer.Option(None, help="patch side (default: sidecar, file name or inferred)")),
    _opt("in_channels", Optional[int], typer.Option(None, help="image channels, 1 or 3 (default: inferred)")),
    _opt("head_dim", Optional[int], typer.Option(None, help="attention head size (default: sidecar, else 64)")),
]


SOLVER_HELP = ("transformer step: auto (eager on a CPU, graphs on CUDA), eager, static (static buffers), "
               "graphs (CUDA graphs) or compile (torch.compile + graphs); not part of the schedule. A capture "
               "or compilation that fails falls back to eager with one warning")
SOLVER_OPTIONS = [_opt("solver", str, typer.Option("auto", help=SOLVER_HELP))]


class SolverRequest:
    """The --solver a command was given; `choice(device)` builds the factory the sampler takes,
    warning once on stderr if it falls back to eager."""

    def __init__(self, solver: str):
        from tarflow.solvers import SOLVER_NAMES

        names = [s.strip() for s in solver.split(",") if s.strip()]
        if not names or any(s not in SOLVER_NAMES for s in names):
            raise UserError(f"--solver takes {', '.join(SOLVER_NAMES)}, got {solver!r}")
        self.names = names

    def choice(self, device, name: str | None = None):
        from tarflow.solvers import SolverChoice

        return SolverChoice(name or self.names[0], device,
                            on_fallback=lambda why: typer.echo(f"warning: {why}", err=True))


def solver_options(fn):
    """--solver, shared by every command that samples."""
    return _inject("solver", SOLVER_OPTIONS, SolverRequest)(fn)


def model_command(app, name: str | None = None):
    """Register a command that loads a checkpoint and samples: one-line errors, and the
    geometry and sampling option groups."""
    def deco(fn):
        return app.command(name)(user_errors(geometry_options(sampling_options(fn))))
    return deco


def sampling_options(fn):
    """The sampling options of `sample`, shared by every command that samples."""
    from tarflow.settings import SamplingRequest

    return _inject("sampling", SAMPLING_OPTIONS, SamplingRequest)(fn)


def geometry_options(fn):
    """Checkpoint geometry overrides, shared by every command that loads a checkpoint."""
    return _inject("geometry", GEOMETRY_OPTIONS, lambda **kw: {k: v for k, v in kw.items() if v is not None})(fn)


def load_model(checkpoint: Path, geometry: dict, device: str, dtype=None):
    import torch

    from tarflow.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, device=device, dtype=dtype or torch.float32, **geometry)


def recorded_sampling(schedule_specs: list[str]):
    """Sampling settings recorded by schedule files among the specs: {spec: settings}."""
    from tarflow.schedule import Schedule

    out = {}
    for spec in schedule_specs:
        if Path(spec).suffix == ".json" or Path(spec).is_file():
            rec = Schedule.load(spec).sampling
            if rec is not None:
                out[spec] = rec
    return out


def check_agreement(recorded: dict, request) -> None:
    """Refuse schedules that recorded different sampling settings unless the command line
    decides every setting they disagree on."""
    if not recorded:
        return
    specs = list(recorded)
    first = recorded[specs[0]]
    for spec in specs[1:]:
        open_keys = [k for k in first.differences(recorded[spec]) if k not in request.given()
                     and not (k == "denoise_std" and {"denoise", "noise_std"} & set(request.given()))]
        if open_keys:
            flag = {"denoise_std": "noise-std"}.get(open_keys[0], open_keys[0].replace("_", "-"))
            raise UserError(f"{specs[0]} and {spec} were tuned with different sampling settings "
                            f"({', '.join(open_keys)}): say which to use, e.g. --{flag} ...")


def settings_for(request, model, recorded: dict | None = None):
    """Final sampling settings: given > recorded by the schedule(s) > defaults. `recorded` maps a
    schedule to what it recorded; each that is overridden gets a one-line warning."""
    recorded = recorded or {}
    base = next(iter(recorded.values()), None)
    settings = request.resolve(recorded=base, training_noise_std=model.meta.get("noise_std"))
    settings.check_model(model)
    for spec, rec in recorded.items():
        if rec != settings:
            diff = ", ".join(f"{k} {getattr(rec, k)!r} -> {getattr(settings, k)!r}"
                             for k in settings.differences(rec))
            typer.echo(f"warning: {Path(spec).name} was tuned with other sampling settings ({diff}); "
                       "its speed and fidelity were measured for those", err=True)
    return settings


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def ensure_writable(path: Path) -> None:
    """Fail before any work if the output folder could not be created or written; creates
    nothing (the folder appears with the first complete result)."""
    parent = path.parent.absolute()
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create output folder {path.parent}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path.parent} is not writable ({existing})")


def progress_bar(disable: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=disable)


def refuse_overwrite(path: Path, files: tuple[str, ...], overwrite: bool) -> None:
    """Refuse before any work to replace an existing result, unless asked to."""
    existing = [f for f in files if (path / f).exists()]
    if existing and not overwrite:
        raise UserError(f"{path} already holds {existing[0]}; pass --overwrite or choose another --out")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    ensure_writable(path / files[0])


def parse_drift(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--max-drift takes a number (0-255 pixel RMSE) or 'off', got {text!r}") from None


def parse_modes(text: str) -> tuple[str, ...]:
    from tuner.search.space import MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"--modes takes a comma list of {', '.join(MODES)}, got {text!r}")
    return modes
