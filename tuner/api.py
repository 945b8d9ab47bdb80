"""The tuner as Python calls, for a model already in memory (a notebook, a training script).

`tarflow-tuner profile` and `tarflow-tuner tune` are these two functions plus option parsing
and printing, so a schedule tuned here is the schedule the command line would have tuned, with
the same defaults and the same files in `out`:

    from tuner.api import profile, tune

    prof = profile(model, data="calib.npz")                    # a tuner.measure.profile.Profile
    print("\n".join(plan(model, profile=prof, trials=50).lines()))  # what tune would cost, nothing run
    summary, schedule = tune(model, data="calib.npz", out="runs/mine")

`model` is a `TarFlow` or anything `tarflow.checkpoint.as_tarflow` accepts (an nn.Module or a
state_dict holding the official keys; call `as_tarflow(m, img_size=...)` yourself when its
geometry has to be given). It is used as it is, on its device and in its dtype: nothing here
moves or casts it. Bad input raises `tarflow.errors.UserError` naming the keyword (`setting`),
before any work wherever it can be seen before.

Sits above the stage packages (it calls search and report); only `tuner.cli` imports it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tarflow.errors import UserError
from tuner.bundled import DEFAULT_CALIB, DEFAULT_PROFILE, portable

if TYPE_CHECKING:
    from tarflow.schedule import Schedule
    from tuner.measure.profile import Profile
    from tuner.search.plan import Forecast
    from tuner.search.summary import StudySummary

PROFILE_FILES = ("profile.csv", "convergence.csv", "iters_to_tol.csv", "profile.json")


class Tuned(NamedTuple):
    """What `tune` returns: the study summary (as summary.json holds it) and the exported schedule,
    None when no schedule met the FID tolerance and the drift limit (then none was written)."""

    summary: StudySummary
    schedule: Schedule | None


def profile(model, *, data=DEFAULT_CALIB, n: int | None = 256, seed: int = 0, curve_n: int = 64,
            settings=None, out=None, overwrite: bool = False, progress=None) -> Profile:
    """Per-block CRM, IGM and measured GS-Jacobi convergence curves on calibration images.

    data: npz or image folder; n: images drawn from it (all, in order, when it holds exactly n;
    None: all of them up to 256); curve_n: the first images the convergence curves run on;
    settings: `tarflow.settings.SamplingSettings` (or its dict) the schedule will sample with,
    default the plain sampler in the model's dtype. A class-conditional model sees each labelled
    image with its own label, unconditionally only with `labels="uncond"`
    (`tuner.measure.profile.calibration_labels`); `meta["labels"]` says which. out: folder to
    write profile.csv, convergence.csv, iters_to_tol.csv and profile.json into (None: write
    nothing); progress: a rich `Progress`, shown while the blocks are measured."""
    if (n is not None and n < 1) or curve_n < 1:
        raise UserError(f"n and curve_n must be >= 1, got {n} and {curve_n}", setting="n,curve_n")
    if out is not None:
        check_out(Path(out), PROFILE_FILES, overwrite)
    model, settings, _ = prepare(model, settings)
    calib = _calibration(model, data, n, seed, settings)
    with _shown(progress):
        return _measure(model, calib, settings, curve_n, progress, out)


def tune(model, *, data=DEFAULT_CALIB, settings=None, profile=None, out="runs/tune", tolerance: float = 10.0,
         trials: int = 30, timeout: float | None = None, batch: int = 16, n: int = 256, verify_n: int = 1024,
         extractor: str | None = None, verify_extractor: str | None = None, ref=None, verify_ref=None,
         ref_data=None, prune_rmse: float = 12.0, objective: str | None = None,
         max_drift: float | None = 2.0, modes=("segments", "frontier"), heartbeat: int = 60,
         solver: str = "auto", seed: int = 0, retime_rounds: int = 3,
         storage: str | None = None, study: str = "tarflow-tune", resume: bool = False, storage_retry: float = 300.0,
         overwrite: bool = False, report: bool = True, checkpoint: str | None = None, log=print,
         progress=None) -> Tuned:
    """Search the fastest per-block schedule within an FID tolerance and a drift limit; writes the
    study folder `out` (schedule.json, trials.csv, summary.json, study.db, profile/, seeds/,
    pictures/ and, with `report`, report.html) and returns `Tuned(summary, schedule)`.

    The keywords and defaults are the `tarflow-tuner tune` options (`tuner.search.config.TuneConfig`
    documents each): data is the profile's calibration set; settings what is sampled (see
    `profile`); profile: a `profile(...)` of this model under these settings to use instead of
    measuring one (a notebook profiles once and tunes many times); extractor / verify_extractor default to mnist-cnn for 28x28 grey models on a CPU
    and Inception otherwise; objective to latency on a GPU and passes on a CPU; max_drift None
    turns the drift limit off; solver: the transformer step every run uses (`tarflow.solvers`); retime_rounds: how many interleaved rounds re-time the winner against the
    seeds once it is exported (the latencies the schedule records). storage: an Optuna URL (default sqlite in `out`) shared by workers
    with the same `study` name; resume adds the trials a study still lacks; storage_retry: seconds
    a lost storage connection is retried before `tuner.search.outage.StorageGone`; checkpoint: where
    the weights came from, recorded in summary.json. log: one-line messages; progress: a rich
    `Progress`, shown while the profile and the trials run, with a bar for each."""
    from tarflow.schedule import Schedule
    from tuner.search.run import tune as run_search

    out = Path(out)
    check_out(out, ("schedule.json",), overwrite or resume, "overwrite=True (or resume=True)")
    model, settings, device = prepare(model, settings)
    cfg = tune_config(model, device, settings, log, tolerance=tolerance, trials=trials, timeout=timeout,
                      batch=batch, n=n, verify_n=verify_n, extractor=extractor,
                      verify_extractor=verify_extractor, prune_rmse=prune_rmse, objective=objective,
                      max_drift=max_drift, modes=tuple(modes), heartbeat=heartbeat, solver=solver,
                      seed=seed, storage_retry=storage_retry, retime_rounds=retime_rounds)
    url = storage or f"sqlite:///{(out / 'study.db').as_posix()}"
    _preflight(cfg, model, storage and url)
    prof = _given_profile(profile, model, settings) or _reused_profile(out / "profile", resume)
    if prof is None and (committed := _committed_profile(model, data, settings)) is not None:
        prof = profile = committed  # saved into the study folder below, as a given profile is
        log(f"profile: the committed one of the bundled model ({portable(DEFAULT_PROFILE)}: same weights, "
            "calibration set and sampling settings)")
    calib = _calibration(model, data, None, seed, settings) if prof is None else None
    with _shown(progress):
        if prof is None:
            prof = _measure(model, calib, settings, CURVE_N, progress, out / "profile")
        elif profile is not None:
            prof.save(out / "profile")  # the study folder holds the profile its seeds came from
        summary = run_search(model, prof, cfg, device=device, out=out, storage=url, study_name=study,
                             resume=resume, ref=ref, verify_ref=verify_ref, data=ref_data, log=log,
                             progress=_trials_bar(progress, trials), checkpoint=checkpoint)
    if report:
        from tuner.report import write_report

        write_report(out, out / "report.html")
    return Tuned(summary, None if summary.schedule is None else Schedule.from_dict(summary.schedule))


# the tune keywords that make its TuneConfig (tune_config), as `plan` passes them on
CONFIG_KEYS = ("tolerance", "trials", "timeout", "batch", "n", "verify_n", "extractor", "verify_extractor",
               "prune_rmse", "objective", "max_drift", "modes", "heartbeat", "solver", "seed", "storage_retry",
               "retime_rounds")


def plan(model, *, data=DEFAULT_CALIB, settings=None, profile=None, log=print, progress=None, **options) -> Forecast:
    """What `tune(model, **options)` would spend sampling, without running it: serial passes,
    tokens and sequential-batch equivalents per stage and, from a sequential and a Jacobi batch
    timed here (four batches are sampled), minutes on this device, plus minutes on the profiled
    device with a `cost:` objective (`tuner.search.plan` says how it is estimated). Takes `tune`'s keywords and checks
    them as `tune` does; those that only place the study (out, storage, study, overwrite, report,
    checkpoint) are accepted and change nothing. Writes nothing and creates no study: the profile
    is the one given, the one a `resume=True` study folder holds, or measured on `data` and not
    kept. Returns a `Forecast` (`lines()` is what `tune` prints before its first trial)."""
    import inspect

    from tuner.search.plan import plan_tune

    defaults = {k: p.default for k, p in inspect.signature(tune).parameters.items() if k != "model"}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"plan() got unknown option(s) {', '.join(unknown)} (it takes tune's keywords)",
                        setting=",".join(unknown))
    kw = defaults | options
    model, settings, device = prepare(model, settings)
    cfg = tune_config(model, device, settings, log, **{k: kw[k] for k in CONFIG_KEYS} | {"modes": tuple(kw["modes"])})
    _preflight(cfg, model, None)
    prof = (_given_profile(profile, model, settings) or _reused_profile(Path(kw["out"]) / "profile", kw["resume"])
            or _committed_profile(model, data, settings))
    calib = _calibration(model, data, None, cfg.seed, settings) if prof is None else None
    with _shown(progress):
        prof = prof or _measure(model, calib, settings, CURVE_N, progress, None)
    return plan_tune(model, prof, cfg, device)


def prepare(model, settings):
    """(TarFlow, SamplingSettings, device) for a model in memory: the settings default to the
    plain sampler in the model's own dtype, and settings that name another dtype are refused
    (they would record a precision the model does not run in; the CLI loads the model in it)."""
    from tarflow.checkpoint import as_tarflow
    from tarflow.settings import DTYPES, SamplingSettings

    model = as_tarflow(model)
    dtype = next((k for k, v in DTYPES.items() if v == model.var.dtype), str(model.var.dtype))
    if settings is None:
        settings = SamplingSettings(dtype=dtype)
    elif isinstance(settings, dict):
        settings = SamplingSettings.from_dict(settings, "settings")
    elif not isinstance(settings, SamplingSettings):
        raise UserError(f"settings must be a SamplingSettings or its dict, got {type(settings).__name__}",
                        setting="settings")
    if settings.dtype != dtype:
        raise UserError(f"the model runs in {dtype} but the settings say dtype {settings.dtype!r}: cast the "
                        f"model or pass settings with dtype {dtype!r}", setting="dtype")
    settings.check_model(model)
    device = model.var.device.type
    if device not in ("cpu", "cuda"):
        raise UserError(f"the model is on {device}: the tuner runs on cpu or cuda", setting="model")
    return model, settings, device


def tune_config(model, device: str, settings, log=print, **options):
    """The TuneConfig of a tune: the device-dependent defaults (extractors, objective) filled in,
    the modes checked, and a note when Inception features will take minutes on this CPU."""
    from tarflow.solvers import SOLVER_NAMES
    from tuner.quality.extractors import INCEPTION_CPU_S, tune_extractors
    from tuner.search.objectives import default_objective
    from tuner.search.config import TuneConfig
    from tuner.search.space import MODES

    modes = options["modes"]
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"modes must be some of {', '.join(MODES)}, got {modes!r}", setting="modes")
    if options["solver"] not in SOLVER_NAMES:  # the search builds it only after the profile
        raise UserError(f"solver must be one of {', '.join(SOLVER_NAMES)}, got {options['solver']!r}",
                        setting="solver")
    ext, vext = tune_extractors(model, device, options["extractor"], options["verify_extractor"])
    objective = options["objective"] or default_objective(device)
    cfg = TuneConfig(**(options | {"extractor": ext, "verify_extractor": vext, "objective": objective,
                                   "sampling": settings}))
    images = (cfg.trials + 4) * cfg.n * (ext == "inception") + 4 * cfg.verify_n * (vext == "inception")
    if device == "cpu" and images:
        log(f"note: Inception features on this CPU cost ~{INCEPTION_CPU_S:.2f} s/image: about "
            f"{images * INCEPTION_CPU_S / 60:.0f} min for {images} images in this run")
    return cfg


def _preflight(cfg, model, storage_url: str | None) -> None:
    """What would fail after the (minutes-long) profile fails now: a device profile of another
    workload, an unreachable database."""
    from tuner.search.studies import open_storage

    if cfg.cost_model is not None:
        cfg.cost_model.check_fits(model, cfg.batch, cfg.sampling)
    if storage_url:
        open_storage(storage_url, cfg.heartbeat)


CURVE_N = 64  # calibration images whose convergence curves a tune's profile measures


def _committed_profile(model, data, settings):
    """The bundled model's committed profile when a tune would measure exactly it: the same
    weights, the bundled calibration set (all of it: the seed draws nothing) and the same
    sampling settings. Profiling is deterministic; measuring it again took about a minute of the
    default tune on a 2-core CPU. None otherwise (a user's model is always profiled)."""
    from tuner.measure.profile import Profile

    if (not isinstance(data, (str, Path)) or Path(data).resolve() != DEFAULT_CALIB.resolve()
            or not (DEFAULT_PROFILE / "profile.json").is_file()):
        return None
    prof = Profile.load(DEFAULT_PROFILE)
    same = {"fingerprint": model.fingerprint, "sampling": settings.to_dict(), "curve_n": CURVE_N}
    return prof if all(prof.meta.get(k) == v for k, v in same.items()) else None


def _given_profile(prof, model, settings):
    """A profile passed in, if any, checked to be of this model under these sampling settings:
    its budgets and curves describe nothing else."""
    if prof is None:
        return None
    if prof.meta.get("fingerprint") != model.fingerprint:
        raise UserError("the profile was measured on other weights than this model's", setting="profile")
    if prof.meta.get("sampling") != settings.to_dict():
        raise UserError(f"the profile was measured under other sampling settings ({prof.meta.get('sampling')}) "
                        f"than these ({settings.to_dict()})", setting="profile")
    return prof


def _reused_profile(prof_dir: Path, resume: bool):
    """A resumed study keeps the profile its trials were seeded from (None: measure one)."""
    from tuner.measure.profile import Profile

    return Profile.load(prof_dir) if resume and (prof_dir / "profile.json").is_file() else None


def _calibration(model, data, n, seed: int, settings):
    """(images, labels, how profile.json describes the labels): read and checked before any
    measuring starts."""
    from tuner.measure.profile import calibration_batch, calibration_labels

    x, y = calibration_batch(data, n, seed, model)
    return (x, *calibration_labels(y, settings, model))


def _measure(model, calib, settings, curve_n: int, progress, out):
    from tuner.measure.profile import run_profile

    x, y, described = calib
    prof = run_profile(model, x, y, settings=settings, curve_n=curve_n, progress=progress, labels=described)
    if out is not None:
        prof.save(Path(out))
    return prof


@contextmanager
def _shown(progress):
    """Draw a rich Progress while the work inside runs, and only then: started earlier, an error
    found by the checks would no longer be the only line printed. One already started stays so."""
    if progress is None or progress.live.is_started:
        yield
        return
    with progress:
        yield


def _trials_bar(progress, trials: int):
    """The search's per-trial callback, drawing on a rich Progress (None: no callback)."""
    if progress is None:
        return None
    task = progress.add_task("trials", total=trials)

    def report(done: int, best: str, feasible: int) -> None:
        progress.update(task, completed=min(done, trials),
                        description=f"trials (best feasible {best}, {feasible} feasible)")
    return report


def check_out(out: Path, files: tuple[str, ...], replace: bool, how: str = "overwrite=True") -> None:
    """Refuse, before any work, an output folder that could not be created or written, or one
    holding a result (`files`) this run would replace unless told it may (`how` says how).
    Creates nothing: the folder appears with the first complete result."""
    out = Path(out)
    existing = [f for f in files if (out / f).exists()]
    if existing and not replace:
        raise UserError(f"{out} already holds {existing[0]}; pass {how} or choose another output folder",
                        setting="overwrite,resume")
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    here = out.absolute()
    found = next(p for p in (here, *here.parents) if p.exists())
    if not found.is_dir():
        raise UserError(f"cannot create output folder {out}: {found} is not a folder")
    if not os.access(found, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable ({found})")
