"""What a tune spends, accounted and announced (tuner.search.accounting, tuner.search.plan), and
trials that stop as soon as the drift limit is broken (tuner.search.evaluate.Screen)."""

import json
import re
import shutil

import optuna
import pandas as pd
import pytest

from tarflow.errors import UserError
from tarflow.schedule import builtin_schedule
from tuner.measure.profile import Profile
from tuner.quality.extractors import get_extractor
from tuner.quality.fid import RefStats, default_ref_path
from tuner.search import evaluate
from tuner.search.accounting import STAGES, TRIAL_ATTR
from tuner.search.config import TuneConfig
from tuner.search.summary import StudySummary

from .conftest import ROOT, TINY_STUDY_ARGS, run_cli, with_args

PASSES_STUDY = ROOT / "studies" / "mnist" / "tune_passes"  # its profile: the bundled model, unguided
SEQ_BATCH = 4 * 48  # B (T - 1) of the bundled model


def test_each_trial_records_what_the_sampler_counted_also_when_the_drift_limit_stops_it(model, monkeypatch):
    """A counting wrapper around the sampler the evaluator calls is the ground truth: every
    trial's recorded passes, tokens and batches equal what it counted during that trial. One-segment
    Jacobi at tol 1e-1 drifts at most 0.24, 0.14, 0.41, 1.4 /255 on the four search batches (seed 0,
    n = 64): with a limit of 0.3 it must stop after batch 3 of 4, exactly, with its reason; at tol 1e-2
    (at most 0.063) it completes."""
    counted, now = {}, {"trial": None}
    real = evaluate.sample

    def counting(*args, **kwargs):
        x, st = real(*args, **kwargs)
        if now["trial"] is not None:
            c = counted.setdefault(now["trial"], {"passes": 0, "tokens": 0, "batches": 0})
            c["passes"] += st.passes
            c["tokens"] += sum(st.tokens)
            c["batches"] += 1
        return x, st

    monkeypatch.setattr(evaluate, "sample", counting)
    ext = get_extractor("mnist-cnn")
    cfg = TuneConfig(n=64, batch=16, verify_n=256, max_drift=0.3, objective="passes", modes=("segments",))
    ev = evaluate.Evaluator(model, Profile.load(PASSES_STUDY / "profile"), cfg, "cpu",
                            RefStats.load(default_ref_path(ext.name)), ext)
    ev.prepare()
    study = optuna.create_study(direction="minimize")
    for tol in ("1e-1", "1e-2"):
        study.enqueue_trial(ev.space.params_of(builtin_schedule(f"jacobi:segments=1,max_iters=49,tol={tol}", model)))

    def objective(trial):
        now["trial"] = trial.number
        try:
            return ev(trial)
        finally:
            now["trial"] = None

    study.optimize(objective, n_trials=2)
    stopped, done = study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and done.state == optuna.trial.TrialState.COMPLETE
    reason = stopped.user_attrs["fail_reason"]
    assert reason.startswith("pruned: drift") and "batch 3 of 4" in reason, reason
    assert stopped.constraints["drift"] > 0  # counted infeasible by TPE, as the full evaluation would have been
    assert done.user_attrs["proxy"]["rmse_max"] <= 0.3
    for t in (stopped, done):
        rec = t.user_attrs[TRIAL_ATTR]
        assert {k: rec[k] for k in ("passes", "tokens", "batches")} == counted[t.number]
        assert rec["seconds"] > 0
    assert stopped.user_attrs[TRIAL_ATTR]["batches"] == 3
    assert stopped.user_attrs["proxy"]["n"] == 48 and stopped.user_attrs["proxy"]["rmse_max"] > 0.3  # what it saw
    assert done.user_attrs[TRIAL_ATTR]["passes"] == done.user_attrs["passes"]  # the objective's own count


def test_a_tune_records_its_cost_per_stage_and_says_it(tiny_study, model):
    out, output = tiny_study
    summary = StudySummary.load(out / "summary.json")
    cost = summary.cost
    assert list(cost.stages) == list(STAGES)
    trials = [t for t in optuna.load_study(study_name="tarflow-tune", storage=f"sqlite:///{out / 'study.db'}").trials
              if t.state.is_finished()]  # (an enqueued trial the cap left waiting never ran)
    recs = [t.user_attrs[TRIAL_ATTR] for t in trials]
    assert cost.trials == len(trials) and cost.unrecorded == 0
    assert cost.stages["search"].passes == sum(r["passes"] for r in recs)  # the trials' own records, summed
    assert cost.stages["search"].tokens == sum(r["tokens"] for r in recs)
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("seed") != "sequential":
            assert t.user_attrs[TRIAL_ATTR]["passes"] == t.user_attrs["passes"]  # (the sequential seed: below)
    table = pd.read_csv(out / "trials.csv")
    assert table.cost_passes.sum() == cost.stages["search"].passes
    stopped = table[table.state == "PRUNED"]  # e.g. the `jacobi` seed: a sample 42/255 off in its first batch
    assert cost.stopped_early == len(stopped) and cost.stopped_early_passes == stopped.cost_passes.sum()
    assert stopped.fail_reason.str.startswith("pruned: ").all()
    n, batch, verify_n = (int(TINY_STUDY_ARGS[TINY_STUDY_ARGS.index(f) + 1]) for f in ("--n", "--batch", "--verify-n"))
    floor = cost.stages["noise_floor"]  # three sequential runs of n samples in one batch each
    assert (floor.passes, floor.tokens, floor.batches) == (3 * SEQ_BATCH, 3 * SEQ_BATCH, 3)
    base = cost.stages["baseline"]  # n / batch sequential batches, plus the forecast's two timed Jacobi batches
    assert base.batches == n // batch + 2 and base.passes > n // batch * SEQ_BATCH
    assert cost.stages["verification"].passes > verify_n // batch * SEQ_BATCH  # sequential on fresh noise + winner
    assert cost.stages["retiming"].batches > 0
    pred = optuna.load_study(study_name="tarflow-tune", storage=f"sqlite:///{out / 'study.db'}").user_attrs["model_seed"]
    calibration = cost.stages["model_seed"]  # the drift model's calibration, before the first trial
    assert calibration.passes == pred["calibration"]["passes"] > 0 and calibration.tokens > calibration.passes
    for s in cost.stages.values():
        assert s.sequential_batches == pytest.approx(s.passes / SEQ_BATCH, abs=1e-3) and s.seconds > 0
    assert set(cost.estimate) == set(STAGES)
    assert cost.estimate["baseline"].passes == n // batch * SEQ_BATCH
    assert output.index("expected cost of this tune") < output.index("verify trial")  # announced first
    assert re.search(rf"this tune cost [\d,]+ serial passes = [\d,]+ sequential batches of {batch}", output), output
    assert "What the tune cost" in (out / "report.html").read_text()


def test_the_sequential_seed_is_the_baselines_run_and_samples_nothing(tiny_study):
    """Token by token in every block is the sequential sampler, which the baseline already ran on
    the search noise: the seed's trial takes its samples (same FID, no drift) and costs nothing."""
    out, _ = tiny_study
    summary = StudySummary.load(out / "summary.json")
    table = pd.read_csv(out / "trials.csv")
    seq = table[table.seed == "sequential"].iloc[0]
    assert seq.state == "COMPLETE" and seq.cost_passes == 0 and seq.cost_tokens == 0
    assert seq.fid == summary.sequential.fid and seq.proxy_rmse_max == 0
    assert seq.objective == summary.sequential.objective_value  # 192 serial passes per batch: what it runs
    others = table[(table.seed != "sequential") & (table.state == "COMPLETE")]
    assert (others.cost_passes > 0).all()


def test_summaries_without_a_cost_still_load():
    d = json.loads((PASSES_STUDY / "summary.json").read_text())
    assert "cost" not in d and d["version"] == 2
    assert StudySummary.from_dict(d).cost is None
    from tuner.cli.verdict import cost_lines

    assert cost_lines(StudySummary.from_dict(d)) == []


def test_plan_prints_the_estimate_and_runs_no_trial(tiny_study, tiny_calib, tmp_path):
    """`tune --plan` with the tiny study's options: the forecast and nothing else (its profile is
    reused from the folder with --resume, so the test does not pay for one)."""
    out = tmp_path / "planned"
    shutil.copytree(tiny_study[0] / "profile", out / "profile")
    res = run_cli("tune", *with_args(TINY_STUDY_ARGS, trials=20), "--data", tiny_calib, "--out", out, "--resume",
                  "--plan")
    assert res.exit_code == 0, res.output
    assert "expected cost of this tune" in res.output and "min here" in res.output, res.output
    assert "noise floor ~576" in res.output  # 3 floor seeds x B(T-1)
    per_trial = re.search(r"search ~[\d,]+ \(20 trials x 1 batches: \d seeds, then ~(\d+) passes per batch", res.output)
    assert per_trial and 4 <= int(per_trial.group(1)) <= SEQ_BATCH, res.output  # random draws from the space
    assert sorted(p.name for p in out.iterdir()) == ["profile"]  # no study.db, no trial, nothing written
    res = run_cli("tune", *with_args(TINY_STUDY_ARGS, trials=0), "--out", out, "--plan")
    assert res.exit_code == 2 and res.output.startswith("error: ") and "--trials" in res.output


def test_plan_refuses_what_tune_would_refuse(model):
    from tuner.api import plan

    with pytest.raises(UserError) as e:
        plan(model, trialz=5)
    assert e.value.setting == "trialz"
    with pytest.raises(UserError) as e:
        plan(model, n=30, batch=16)
    assert "n,batch" in e.value.setting


@pytest.mark.parametrize("study", ["mnist/tune_default", "mnist_p2/tune_verified"])
def test_the_forecast_of_a_committed_tune_is_close_to_what_it_spent(study):
    """From the study's own profile, options and seeds, the forecast (tuner.search.plan) of each
    stage against what the tune recorded spending: the verification (its full checks of the
    refinement's base and the winner, the screened steps) within a quarter, the search within a
    half (before the slow stop was forecast it said 60,927 for 7,718 on the patch-2 tune), the
    whole tune within a fifth."""
    from tarflow.checkpoint import load_checkpoint
    from tarflow.schedule import Schedule
    from tarflow.settings import SamplingSettings
    from tuner.search.plan import forecast

    folder = ROOT / "studies" / study
    d = json.loads((folder / "summary.json").read_text())
    model = load_checkpoint(ROOT / d["checkpoint"])
    cfg = TuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["config"].items()},
                     sampling=SamplingSettings(**d["sampling"]))
    seeds = {p.stem: Schedule.load(p) for p in sorted((folder / "seeds").glob("*.json"), key=_seed_order)}
    said = forecast(model, Profile.load(folder / "profile"), cfg, seeds=seeds).stages
    spent = StudySummary.load(folder / "summary.json").cost.stages
    ratio = {k: said[k].passes / spent[k].passes for k in ("verification", "search")}
    assert 0.75 <= ratio["verification"] <= 1.25 and 0.5 <= ratio["search"] <= 1.5, ratio
    total = sum(s.passes for s in said.values()) / sum(s.passes for s in spent.values())
    assert 0.8 <= total <= 1.2, total


def _seed_order(path):
    """Seeds in the order a tune enqueues them (tuner.search.seeds; the model seed second)."""
    order = ["sequential", "model", "paper", "sejd", "jacobi", "jacobi1", "frontier"]
    return order.index(path.stem) if path.stem in order else len(order)


@pytest.mark.parametrize("objective", ["passes", "latency"])
def test_a_trial_much_slower_than_the_best_stops_after_its_first_batch_where_the_objective_is_counted(
        model, objective):
    """One-segment Jacobi at tol 1e-2 (about 37 passes per batch) runs first and is feasible; SeJD
    (its first block token by token: about 62) then costs more than SLOW_PRUNE x that on its first
    batch. Counted in passes it is stopped there, with its reason, having paid for one batch; by
    measured latency (a timed warm-up says nothing) it runs to the end."""
    from tuner.search.evaluate import SLOW_PRUNE

    ext = get_extractor("mnist-cnn")
    cfg = TuneConfig(n=48, batch=16, verify_n=256, max_drift=2.0, objective=objective, modes=("segments",))
    ev = evaluate.Evaluator(model, Profile.load(PASSES_STUDY / "profile"), cfg, "cpu",
                            RefStats.load(default_ref_path(ext.name)), ext)
    ev.prepare()
    study = optuna.create_study(direction="minimize")
    for spec in ("jacobi:segments=1,tol=1e-2", "sejd:tol=0.03"):
        study.enqueue_trial(ev.space.params_of(builtin_schedule(spec, model)))
    study.optimize(ev, n_trials=2)
    fast, slow = study.trials
    assert fast.state == optuna.trial.TrialState.COMPLETE and fast.constraints["drift"] <= 0
    if objective == "passes":
        assert slow.state == optuna.trial.TrialState.PRUNED and slow.user_attrs[TRIAL_ATTR]["batches"] == 1
        first = slow.user_attrs[TRIAL_ATTR]["passes"]
        assert first > SLOW_PRUNE * fast.value
        assert slow.user_attrs["fail_reason"] == (f"pruned: slow: {first} passes on the first batch > "
                                                  f"{SLOW_PRUNE:g} x the best feasible trial's {fast.value:g} passes")
    else:
        assert slow.state == optuna.trial.TrialState.COMPLETE and slow.user_attrs[TRIAL_ATTR]["batches"] == 3
