"""Optuna search for the fastest per-block GS-Jacobi schedule within an FID tolerance.

objective(trial) = measured sampling latency of the schedule (median over timed batches after a
warm-up batch, device-synchronised); constraint (`trial.set_constraint`) = FID(schedule) -
FID(sequential, same noise, same n) - tolerance <= 0. Multi-fidelity: the warm-up batch doubles
as a paired-proxy check against the sequential samples, and a schedule whose proxy error is
hopeless is pruned before any FID is paid for.

Parameter names are stable: `b{k}_segments`, `b{k}_init`, `b{k}_anderson`, `b{k}_iters_s{S}`
(forward block k; the budget's range depends on the segment count S, hence its own name), and `tol`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
import torch

from tarflow.checkpoint import atomic_write_text
from tarflow.data import to_uint8
from tarflow.errors import UserError
from tarflow.sampling import make_noise, sample
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule
from tarflow.settings import SamplingSettings

from tuner.measure.device_profile import DeviceProfile
from tuner.quality.extractors import get_extractor
from tuner.quality.fid import RefStats, default_ref_path, fid_against, reference_stats
from tuner.quality.floor import noise_floor, tolerance_check
from tuner.quality.paired import paired_proxy
from tuner.measure.profile import Profile
from tuner.search.space import SearchSpace
from tuner.search.summary import SeedResult, Sequential, StudySummary
from tuner.measure.pictures import write_pictures
from tuner.search.studies import (STARTED, RecordFailures, TrialCap, counted_trials, crashpoint, export_once,
                      feasible_trials, is_feasible, make_study, open_storage, study_config, trials_table)
from tuner.measure.timing import device_info, summarize, timed

PAPER_TOUGH_SEGMENTS, PAPER_TOUGH_ITERS, PAPER_EASY_ITERS = 8, 32, 10
OBJECTIVES = ("latency", "passes")
MIN_DRIFT_VERIFY_N = 256  # a per-sample limit is re-checked on at least this many fresh samples
REFINE_TRIALS = 5  # at most this many of --trials go to refining the best schedule (see refine)


@dataclass(frozen=True)
class TuneConfig:
    tolerance: float = 10.0  # allowed FID increase over sequential (same noise, same n)
    trials: int = 50
    timeout: float | None = None  # seconds for the trial loop
    batch: int = 16  # latency is measured for this batch size
    n: int = 512  # FID samples per trial (a multiple of batch)
    verify_n: int = 1024  # >= 2n, for the re-verification of the winner
    extractor: str = "mnist-cnn"
    verify_extractor: str = "mnist-cnn"
    prune_rmse: float = 12.0  # pixel RMSE (0-255) on the warm-up batch above which a trial is pruned
    objective: str = "latency"  # latency (measured here), passes (serial passes per batch) or cost:DEVICE.json
    max_drift: float | None = None  # per-sample pixel RMSE (0-255) vs sequential, max over samples
    modes: tuple[str, ...] = ("segments", "frontier")  # block modes the search may choose
    heartbeat: int = 60  # seconds; a trial silent for 2x this is taken as dead (see open_storage)

    def __post_init__(self):
        """Impossible options are refused before any work."""
        if self.trials < 1 or self.tolerance < 0 or self.batch < 1 or self.heartbeat < 1:
            raise UserError(f"--trials, --batch and --heartbeat must be >= 1 and --tolerance >= 0, got "
                            f"{self.trials}, {self.batch}, {self.heartbeat}, {self.tolerance:g}")
        if self.n % self.batch or self.verify_n < 2 * self.n:
            raise UserError(f"--n ({self.n}) must be a multiple of --batch ({self.batch}) and "
                            f"--verify-n ({self.verify_n}) at least 2x --n")
        if self.max_drift is not None and (self.max_drift < 0 or self.verify_n < MIN_DRIFT_VERIFY_N):
            raise UserError(f"--max-drift must be >= 0 and is re-checked on fresh noise with --verify-n >= "
                            f"{MIN_DRIFT_VERIFY_N} (got {self.max_drift:g}, {self.verify_n})")
        if self.objective not in OBJECTIVES and not self.objective.startswith("cost:"):
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)} or cost:DEVICE.json, "
                            f"got {self.objective!r}")
        if self.objective.startswith("cost:"):
            DeviceProfile.load(self.objective[len("cost:"):])  # a bad file fails before any work

    seed: int = 0
    sampling: SamplingSettings = SamplingSettings()  # what is sampled: every run of the search uses it
    floor_seeds: tuple[int, ...] = (101, 102, 103)

    @property
    def cost_model(self) -> "DeviceProfile | None":
        """The device profile a cost:FILE objective prices passes with."""
        return DeviceProfile.load(self.objective[len("cost:"):]) if self.objective.startswith("cost:") else None


@dataclass
class Baseline:
    """Sequential reference on the search noise: samples, features, FID, latency."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    x: torch.Tensor
    feats: np.ndarray
    fid: float
    latency: dict


@dataclass
class Trialled:
    schedule: Schedule
    latency: dict
    fid: float
    proxy: dict
    passes: int
    iters: list = field(default_factory=list)


class Objective:
    """Holds the model, profile and baseline; `objective(trial)` samples one schedule."""

    def __init__(self, model, profile: Profile, cfg: TuneConfig, device, ref, extractor):
        self.model, self.profile, self.cfg, self.device = model, profile, cfg, device
        self.ref, self.ext = ref, extractor
        self.T, self.B = model.cfg.num_patches, model.cfg.num_blocks
        self.space = SearchSpace.for_model(model, profile, cfg.modes)
        self.baseline: Baseline | None = None
        self.fallbacks = 0  # non-finite segments re-solved token by token in the latest run
        self.cost = cfg.cost_model  # prices each pass on the modelled device (cost:FILE objective)
        if self.cost is not None:
            self.cost.check_fits(model, cfg.batch, cfg.sampling)
        self.modelled_s = None  # the latest run's modelled seconds per batch on that device
        self.trial_number = -1  # the trial being evaluated (crash points name it)

    def schedule_from_params(self, params: dict, name: str) -> Schedule:
        return self.space.schedule_from_params(params, name, self.model.fingerprint)

    def seed_schedules(self) -> dict[str, Schedule]:
        """Known answers the search starts from and the report compares against."""
        prof = self.profile.blocks
        n_tough = max(1, math.ceil(self.B / 4))
        tough = set(prof.sort_values("crm_share", ascending=False).block[:n_tough])
        best = dict(zip(prof.block, prof.best_init))
        paper = []
        for k in range(self.B - 1, -1, -1):
            if k in tough:
                S = min(PAPER_TOUGH_SEGMENTS, self.T)
                paper.append(BlockPlan(k, S, PAPER_TOUGH_ITERS, best[k]))
            else:
                paper.append(BlockPlan(k, 1, PAPER_EASY_ITERS, best[k]))
        seeds = {
            "sequential": builtin_schedule("sequential", self.model),
            "paper": Schedule(plans=tuple(paper), fingerprint=self.model.fingerprint, name="paper"),
            "sejd": builtin_schedule("sejd:tol=0.03", self.model),
            "jacobi": builtin_schedule("jacobi:segments=4,max_iters=6,tol=1e-3", self.model),
            # one segment per block, budgets from the profile, stopped by the tolerance: the
            # fewest passes at small drift on both MNIST models (README, "Results")
            "jacobi1": builtin_schedule(f"jacobi:segments=1,max_iters={self.T},tol=1e-2", self.model),
        }
        if "frontier" in self.cfg.modes:
            seeds["frontier"] = builtin_schedule(f"frontier:window={min(64, self.T)},tol=1e-3", self.model)
        # what was actually run: each seed as it lies in the search space
        return {name: self.schedule_from_params(self.space.params_of(s), name) for name, s in seeds.items()}

    # --- measurement ------------------------------------------------------------------------
    def run(self, sched: Schedule, noise, labels, x_ref=None, prune=None):
        """Sample noise in batches; the first batch is the warm-up (and the proxy check)."""
        bs = self.cfg.batch
        xs, secs, passes, iters, fallbacks, modelled = [], [], 0, None, 0, 0.0
        for i in range(0, len(noise), bs):
            lab = None if labels is None else labels[i:i + bs]
            (x, st), s = timed(lambda: sample(self.model, noise[i:i + bs], sched, labels=lab,
                                                   settings=self.cfg.sampling), self.device)
            xs.append(x.float().cpu())
            passes += st.passes
            fallbacks += len(st.fallbacks)
            if self.cost is not None:
                modelled += self.cost.cost(st.calls, st.blocks)
            iters = iters or st.iters
            if i == 0 and prune is not None and x_ref is not None:
                prune(paired_proxy(xs[0], x_ref[:len(xs[0])]))
                crashpoint("sampling", self.trial_number)
            if i > 0 or len(noise) <= bs:
                secs.append(s)
        self.fallbacks = fallbacks
        self.modelled_s = modelled / -(-len(noise) // bs) if self.cost is not None else None
        return torch.cat(xs), summarize(secs), passes, iters

    def prepare(self, progress=None):
        """Sequential samples, features and FID on the search noise (computed once per run)."""
        cfg = self.cfg
        noise = make_noise(cfg.n, self.model, cfg.seed)
        labels = cfg.sampling.make_labels(cfg.n, self.model, cfg.seed)
        seq = builtin_schedule("sequential", self.model)
        x, lat, _, _ = self.run(seq, noise, labels)
        feats = self.ext.features(to_uint8(x))
        fid = fid_against(None, self.ref, self.ext, features=feats).fid
        self.baseline = Baseline(noise, labels, x, feats, fid, lat)
        return self.baseline

    def evaluate(self, sched: Schedule, prune=None) -> Trialled:
        base = self.baseline
        x, lat, passes, iters = self.run(sched, base.noise, base.labels, base.x, prune)
        feats = self.ext.features(to_uint8(x))
        fid = fid_against(None, self.ref, self.ext, features=feats).fid
        proxy = paired_proxy(x, base.x, self.ext, features_schedule=feats,
                                     features_sequential=base.feats)
        return Trialled(sched, lat, fid, proxy, passes, iters)

    def __call__(self, trial: optuna.Trial) -> float:
        sched = self.space.suggest(trial, f"trial-{trial.number}", self.model.fingerprint)

        def prune(proxy):
            trial.set_user_attr("warmup_rmse", proxy["rmse_mean"])
            trial.report(proxy["rmse_mean"], step=0)
            if proxy["nonfinite"] or proxy["rmse_mean"] > self.cfg.prune_rmse:
                raise optuna.TrialPruned(f"paired proxy RMSE {proxy['rmse_mean']:.3g} > "
                                         f"{self.cfg.prune_rmse:g}")

        self.trial_number = trial.number
        r = self.evaluate(sched, prune)
        crashpoint("fid", trial.number)
        gap = r.fid - self.baseline.fid
        trial.set_user_attr("fid", r.fid)
        crashpoint("storage", trial.number)
        trial.set_user_attr("fid_gap", gap)
        trial.set_user_attr("latency", r.latency)
        trial.set_user_attr("proxy", r.proxy)
        trial.set_user_attr("passes", r.passes)
        trial.set_user_attr("iters", r.iters)
        trial.set_user_attr("fallbacks", self.fallbacks)
        trial.set_constraint("fid_gap", gap - self.cfg.tolerance)
        if self.cfg.max_drift is not None:
            trial.set_constraint("drift", r.proxy["rmse_max"] - self.cfg.max_drift)
        if self.cfg.objective == "passes":
            return r.passes / (len(self.baseline.noise) // self.cfg.batch)
        if self.cost is not None:
            trial.set_user_attr("modelled_s", self.modelled_s)
            return self.modelled_s
        return r.latency["median_s"]


def verify(obj: Objective, candidates, cfg: TuneConfig, vext, vref, log=print):
    """Re-run the best feasible schedules at verify_n on fresh noise; the first that holds wins."""
    model = obj.model
    noise = make_noise(cfg.verify_n, model, cfg.seed + 1)
    labels = cfg.sampling.make_labels(cfg.verify_n, model, cfg.seed + 1)
    seq = builtin_schedule("sequential", model)
    x_seq, _, _, _ = obj.run(seq, noise, labels)
    f_seq = vext.features(to_uint8(x_seq))
    fid_seq = fid_against(None, vref, vext, features=f_seq).fid
    for t, sched in candidates:
        x, _, _, _ = obj.run(sched, noise, labels)
        feats = vext.features(to_uint8(x))
        fid = fid_against(None, vref, vext, features=feats).fid
        proxy = paired_proxy(x, x_seq, vext, features_schedule=feats, features_sequential=f_seq)
        drift_ok = cfg.max_drift is None or proxy["rmse_max"] <= cfg.max_drift
        ok = fid - fid_seq <= cfg.tolerance and drift_ok
        why = "ok" if ok else ("fails the FID tolerance" if drift_ok else
                               f"drifts {proxy['rmse_max']:.3g}/255 > {cfg.max_drift:g} on a sample")
        log(f"verify trial {t.number}: FID {fid:.4g} vs sequential {fid_seq:.4g} "
            f"({vext.id}, n={cfg.verify_n}), max drift {proxy['rmse_max']:.3g}/255 -> {why}")
        if ok:
            return t, sched, {"fid": fid, "fid_sequential": fid_seq, "gap": fid - fid_seq,
                              "extractor": vext.id, "n": cfg.verify_n, "proxy": proxy}
    return None, None, None


def remeasure(obj: Objective, schedules: dict[str, Schedule], rounds: int = 3, batches: int = 4) -> dict:
    """Final latencies, timed interleaved round by round so drift hits every schedule alike.

    The search's per-trial timings carry noise of a few percent on a busy CPU; speed-ups that
    are written into the schedule come from this fairer re-measurement instead.
    """
    base = obj.baseline
    bs = obj.cfg.batch
    noise = base.noise[:bs * batches]
    labels = None if base.labels is None else base.labels[:bs * batches]
    runs = {name: [] for name in schedules}
    for name, sched in schedules.items():  # warm-up
        obj.run(sched, noise[:bs], None if labels is None else labels[:bs])
    for _ in range(rounds):
        for name, sched in schedules.items():
            for i in range(0, len(noise), bs):
                lab = None if labels is None else labels[i:i + bs]
                _, sec = timed(lambda: sample(obj.model, noise[i:i + bs], sched, labels=lab,
                                                settings=obj.cfg.sampling), obj.device)
                runs[name].append(sec)
    return {name: summarize(v) for name, v in runs.items()}


def resolve_ref(extractor, ref_path, data, out: Path, model):
    """Reference statistics: an explicit file, statistics computed from `data` at the model's
    resolution (cached in `out`), or the committed MNIST ones when they fit the model."""
    if ref_path is not None:
        return RefStats.load(ref_path)
    cfg = model.cfg
    shape = [cfg.in_channels, cfg.img_size, cfg.img_size]
    if data is not None:
        return reference_stats(data, extractor=extractor, split="test", size=cfg.img_size,
                               cache_path=out / f"ref_{extractor.name}.npz")
    bundled = default_ref_path(extractor.name)
    if bundled.is_file() and RefStats.load(bundled).meta.get("image_shape") == shape:
        return RefStats.load(bundled)
    raise UserError(f"no reference statistics for {extractor.id} at {'x'.join(map(str, shape))}: "
                    "pass --ref-data (images) or --ref (see `tarflow-tuner fid-ref`)")


def tune(model, profile: Profile, cfg: TuneConfig, *, device, out: Path, storage: str,
         study_name: str, resume: bool, ref=None, verify_ref=None, data=None, log=print,
         progress=None, checkpoint: str | None = None) -> StudySummary:
    """The whole search; writes schedule.json, trials.csv, summary.json, seeds/*.json and the
    report's pictures into `out`. `summary.schedule` is None when no schedule met the tolerance
    (then no schedule file is written). Raises UserError on bad input."""
    ext = get_extractor(cfg.extractor, device=device)
    vext = ext if cfg.verify_extractor == cfg.extractor else get_extractor(cfg.verify_extractor, device=device)
    ref_s = resolve_ref(ext, ref, data, out, model)
    ref_v = ref_s if vext is ext else resolve_ref(vext, verify_ref, data, out, model)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI shows a progress bar instead
    obj = Objective(model, profile, cfg, device, ref_s, ext)
    seeds = obj.seed_schedules()
    study = make_study(open_storage(storage, cfg.heartbeat), study_name, cfg.seed, resume,
                       study_config(cfg, model, device),
                       {name: obj.space.params_of(s) for name, s in seeds.items()})

    t_start = time.perf_counter()
    log(f"sequential baseline on {cfg.n} samples (batch {cfg.batch}) ...")
    base = obj.prepare()
    log(f"sequential: {base.latency['median_s'] * 1e3:.1f} ms/batch, FID {base.fid:.4g} ({ext.id}, n={cfg.n})")
    floor = noise_floor(model, ref=ref_s, extractor=ext, n=cfg.n, seeds=cfg.floor_seeds,
                        settings=cfg.sampling, batch=cfg.n)
    warn = tolerance_check(cfg.tolerance, floor)
    log(f"noise floor: FID {floor['mean']:.4g} ± {floor['std']:.3g} ({ext.id}, n={cfg.n}, "
        f"{len(floor['values'])} seeds)")
    if warn:
        log(f"warning: {warn}")
    run_trials(study, obj, cfg, progress)

    def result() -> dict:
        """Verify and export the winner (run by one worker only, see export_once)."""
        summary = StudySummary(
            study=study_name, checkpoint=checkpoint, model=model.fingerprint, device=device_info(device),
            batch=cfg.batch, tolerance=cfg.tolerance,
            config={k: v for k, v in cfg.__dict__.items() if k != "sampling"}, sampling=cfg.sampling,
            trials=len(counted_trials(study)), feasible=len(feasible_trials(study)),
            search_seconds=round(time.perf_counter() - t_start, 1),
            sequential=Sequential(base.latency, base.fid, ext.id, cfg.n), noise_floor=floor,
            tolerance_warning=warn, seeds=seed_results(study, seeds))
        cands = [(t, obj.schedule_from_params(t.params, f"tuned (trial {t.number})"))
                 for t in feasible_trials(study)]
        # verify the fastest few feasible candidates (sequential, if fastest, passes trivially)
        trial, sched, ver = verify(obj, cands[:3], cfg, vext, ref_v, log) if cands else (None, None, None)
        if sched is not None:
            export(obj, summary, trial, sched, ver, seeds, log)
        return json.loads(json.dumps(summary.to_dict(), default=str))  # as summary.json holds it

    summary = StudySummary.from_dict(export_once(study, cfg.heartbeat, result, log), "the study's stored result")
    sched = None if summary.schedule is None else Schedule.from_dict(summary.schedule)
    out.mkdir(parents=True, exist_ok=True)
    for name, s in seeds.items():  # the baselines compared against, as files `sample` and `bench` run
        s.save(out / "seeds" / f"{name}.json")
    atomic_write_text(out / "trials.csv", trials_table(study, ext.id, cfg.n).to_csv(index=False))
    if sched is not None:
        sched.save(out / "schedule.json")
    write_pictures(model, sched, out / "pictures", settings=cfg.sampling, seed=cfg.seed)
    summary.save(out / "summary.json")
    return summary


def run_trials(study, obj: Objective, cfg: TuneConfig, progress=None) -> None:
    """Run trials until the study holds cfg.trials (its total over --resume and workers): TPE
    first, then the last tenth (at most REFINE_TRIALS) refines the best feasible schedule."""

    def on_trial(study, trial):
        if progress is not None:
            feas = feasible_trials(study)
            unit = (lambda v: f"{v:.0f} passes") if cfg.objective == "passes" else (lambda v: f"{v * 1e3:.1f} ms")
            best = unit(feas[0].value) if feas else "-"
            progress(len(counted_trials(study)), best, len(feas))

    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    cap = optuna.study.MaxTrialsCallback(cfg.trials, states=STARTED)

    def run(n: int) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if n > 0 and (left is None or left > 0):
            study.optimize(TrialCap(RecordFailures(obj), cfg.trials), n_trials=n, timeout=left,
                           callbacks=[on_trial, cap], catch=(Exception,))

    def missing() -> int:
        return max(0, cfg.trials - len(counted_trials(study)))

    reserve = min(REFINE_TRIALS, cfg.trials // 10)
    run(missing() - reserve)
    refine(study, obj.space, reserve, run)
    run(missing())  # whatever the refinement did not use


def refine(study, space: SearchSpace, n: int, run) -> None:
    """Hill-climb the one setting all blocks share: re-run the best feasible trial with a looser
    tolerance while that stays feasible and wins. TPE rarely lands there by itself: on the bundled
    model one-segment Jacobi at tol 3e-2 needs 37 passes, yet 44 TPE trials never tried it."""
    for _ in range(n):
        feas = feasible_trials(study)
        if not feas:
            return
        tried = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)}
        todo = [p for p in space.loosened(feas[0].params) if json.dumps(p, sort_keys=True) not in tried]
        if not todo:
            return
        study.enqueue_trial(todo[0], user_attrs={"refined_from": feas[0].number}, skip_if_exists=True)
        run(1)


def seed_results(study, seeds: dict) -> dict[str, SeedResult]:
    """What the search measured for each seed schedule that completed."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        name = t.user_attrs.get("seed")
        if name:
            a = t.user_attrs
            out[name] = SeedResult(t.number, t.value, a["fid"], a["fid_gap"], is_feasible(t), a["proxy"],
                                   a["passes"], a["iters"], seeds[name].to_dict()["blocks"])
    return out


def export(obj: Objective, summary: StudySummary, trial, sched: Schedule, ver: dict, seeds: dict,
           log=print) -> Schedule:
    """Re-time the winner against the seeds (interleaved) and write what was measured into the
    schedule's provenance and the summary."""
    log("re-timing the chosen schedule against the seeds (interleaved) ...")
    final = remeasure(obj, {"chosen": sched} | {k: seeds[k] for k in summary.seeds})
    lat = final["chosen"]["median_s"]
    seq_lat = final["sequential"]["median_s"] if "sequential" in final else summary.sequential_latency_s
    for k, seed in summary.seeds.items():
        seed.latency_final = final[k]
    cfg, floor = obj.cfg, summary.noise_floor
    prov = {
        "tool": "tarflow-tuner", "tool_version": _version(), "date": time.strftime("%Y-%m-%d"),
        "tolerance": cfg.tolerance, "trial": trial.number, "trials": summary.trials,
        "fid_search": {"fid": trial.user_attrs["fid"], "sequential": summary.sequential.fid,
                       "gap": trial.user_attrs["fid_gap"], "extractor": summary.sequential.extractor,
                       "n": cfg.n, "noise_floor_std": floor["std"], "noise_floor_mean": floor["mean"]},
        "fid_verify": ver, "latency_s": lat, "sequential_latency_s": seq_lat,
        "speedup_vs_sequential": seq_lat / lat,
        "speedup_vs_seeds": {k: final[k]["median_s"] / lat for k in summary.seeds},
        "latency_search_s": trial.value, "equivalent_to_sequential": sched.is_sequential(obj.T),
        "proxy": trial.user_attrs["proxy"], "batch": cfg.batch, "sampling": cfg.sampling.to_dict(),
        "objective": cfg.objective, "objective_value": trial.value, "max_drift": cfg.max_drift,
        "objective_device": (obj.cost.device["device_name"] if obj.cost is not None else
                             summary.device["device_name"] if cfg.objective == "latency" else None),
        "passes_per_batch": trial.user_attrs["passes"] / (cfg.n // cfg.batch),
        **summary.device,
    }
    sched = sched.with_provenance(**prov)
    summary.final_latency = final
    summary.schedule = sched.to_dict()
    summary.chosen_trial = trial.number
    summary.chosen_iters = trial.user_attrs["iters"]
    return sched


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tarflow-tuner")
    except PackageNotFoundError:
        return "unknown"
