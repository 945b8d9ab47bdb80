"""Contracts between modules: per-block solver dispatch, plans valid on construction, sampling
settings shared by every command, any TarFlow (loaded or not) usable everywhere."""

import json

import pytest
import torch

from tarflow.errors import UserError
from tarflow.model import TarFlow, TarFlowConfig
from tarflow.sampling import make_noise, sample
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule
from tarflow.settings import SamplingSettings

from .conftest import CALIB, ROOT, one_line_error, run_cli

run = run_cli


def test_sequential_path_is_chosen_per_block_inside_a_mixed_schedule(model64):
    """SeJD shape: the block sampled first runs token by token, the rest by Jacobi."""
    T = model64.cfg.num_patches
    sched = builtin_schedule("sejd:tol=0", model64)
    seen = []
    noise = make_noise(3, model64, 11)
    y = torch.tensor([0, 4, 9])
    x, stats = sample(model64, noise, sched, labels=y, callback=lambda d: seen.append((d["block"], d["mode"])))
    assert stats.modes == ["sequential", "jacobi", "jacobi", "jacobi"]
    assert seen == [(3, "sequential"), (2, "jacobi"), (1, "jacobi"), (0, "jacobi")]
    assert stats.iters[0] == [1] * (T - 1)  # one single-token step per token, no segment loop
    ref, ref_stats = sample(model64, noise, builtin_schedule("sequential", model64), labels=y)
    assert ref_stats.modes == ["sequential"] * 4
    assert (x - ref).abs().max().item() <= 1e-9


@pytest.mark.parametrize("kwargs,text", [
    ({"segments": 0}, "segments must be >= 1"), ({"max_iters": 0}, "max_iters must be >= 1"),
    ({"init": "ones"}, "unknown init"), ({"tol": -1.0}, "tol must be"), ({"tol": float("nan")}, "tol must be"),
    ({"anderson": 9}, "anderson must be"), ({"segments": 2.5}, "'segments' must be an integer"),
    ({"block": -1}, "block must be >= 0"),
])
def test_block_plan_is_valid_on_construction(kwargs, text):
    args = {"block": 0, "segments": 1, "max_iters": 1} | kwargs
    with pytest.raises(UserError, match=text):
        BlockPlan(**args)


@pytest.mark.parametrize("spec,text", [
    ("jacobi:segments=0", "segments must be >= 1"), ("jacobi:segments=x", "is not a int"),
    ("jacobi:tol=-1", "tol must be"), ("jacobi:init=foo", "unknown init"),
    ("jacobi:anderson=9", "anderson must be"), ("jacobi:max_iters=0", "max_iters must be"),
    ("sejd:tol=nan", "tol must be"), ("sequential:x=1", "takes no parameters"),
    ("jacobi:bogus=1", "unknown parameter 'bogus'"), ("jacobi:segments", "unknown parameter"),
    ("foo", "unknown schedule 'foo'"), ("jacobi:segments=50", "exceeds the sequence length T=49"),
])
def test_every_builtin_spec_error_is_one_line_exit_2(tmp_path, spec, text):
    one_line_error(run("sample", "--n", 1, "--schedule", spec, "--out", tmp_path / "s"), text)
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("args,text", [
    (["--guidance", "-1"], "guidance must be"), (["--dtype", "float8"], "--dtype must be one of"),
    (["--labels", "12"], "class 12 is outside 0..9"), (["--labels", "a,b"], "labels must be"),
    (["--attn-temp", "0"], "--attn-temp must be"), (["--noise-std", "0.1"], "add --denoise"),
])
def test_bad_sampling_options_are_one_line_exit_2(tmp_path, args, text):
    one_line_error(run("sample", "--n", 1, *args, "--out", tmp_path / "s"), text)


def test_a_model_fresh_from_its_constructor_has_a_fingerprint_and_runs_everywhere():
    """No loader involved: schedules, fit checks and bench work on any TarFlow."""
    from tuner.measure.bench import run_bench

    torch.manual_seed(0)
    m = TarFlow(TarFlowConfig(img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                              layers_per_block=1, num_classes=3)).eval()
    fp = m.fingerprint
    sched = builtin_schedule("sejd", m)
    assert sched.fingerprint == fp
    sched.check_fits(m)
    res = run_bench(m, ["sejd"], batch=2, device="cpu", repeats=1, skip_naive=True)
    assert res["model"] == fp and [r["name"] for r in res["rows"]][-1] == "sejd"
    with torch.no_grad():
        m.blocks[0].proj_in.weight.add_(0.1)  # trained further: another model
    assert m.fingerprint["weights_sha256"] != fp["weights_sha256"]
    with pytest.raises(UserError, match="weights differ"):
        sched.check_fits(m)


def _recorded(tmp_path, name, **settings):
    sched = builtin_schedule("sequential", _bundled()).with_provenance(
        sampling=SamplingSettings(**settings).to_dict())
    path = tmp_path / f"{name}.json"
    sched.save(path)
    return path


def _bundled():
    from tarflow.checkpoint import load_checkpoint

    from .conftest import BUNDLED

    return load_checkpoint(BUNDLED)


def test_bench_refuses_schedules_tuned_with_different_settings_unless_told(tmp_path):
    a = _recorded(tmp_path, "a", guidance=1.5)
    b = _recorded(tmp_path, "b", guidance=0.0)
    common = ["bench", a, b, "--batch", 1, "--repeats", 1, "--warmup", 0, "--skip-reference", "--device", "cpu"]
    one_line_error(run(*common), "different sampling settings (guidance)")
    res = run(*common, "--guidance", 1, "--out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["sampling"]["guidance"] == 1.0
    assert res.output.count("was tuned with other sampling settings") == 2  # one line per schedule
    assert "a.json was tuned with other sampling settings (guidance 1.5 -> 1.0)" in res.output


def test_schedule_records_settings_and_rejects_malformed_ones(tmp_path):
    path = _recorded(tmp_path, "g", guidance=2.0, denoise_std=0.1, labels="3,7")
    assert Schedule.load(path).sampling == SamplingSettings(guidance=2.0, denoise_std=0.1, labels="3,7")
    doc = json.loads(path.read_text())
    doc["provenance"]["sampling"]["guidance"] = "lots"
    path.write_text(json.dumps(doc))
    one_line_error(run("sample", "--n", 1, "--schedule", path, "--out", tmp_path / "s"), "guidance must be")


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    """A small unconditional TarFlow trained for a few steps on the committed MNIST sample."""
    out = tmp_path_factory.mktemp("uncond") / "uncond.pth"
    res = run("train", "--data", CALIB, "--out", out, "--classes", 0, "--patch-size", 7, "--channels", 32,
              "--head-dim", 16, "--blocks", 2, "--layers", 1, "--steps", 30, "--batch", 32, "--warmup", 5)
    assert res.exit_code == 0, res.output
    return out


def test_unconditional_model_samples_profiles_and_tunes(uncond_ckpt, tmp_path):
    res = run("sample", "--checkpoint", uncond_ckpt, "--n", 4, "--schedule", "sejd", "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    import numpy as np

    assert (np.load(tmp_path / "s.npz")["labels"] == -1).all()
    one_line_error(run("sample", "--checkpoint", uncond_ckpt, "--guidance", 1, "--out", tmp_path / "g"),
                   "guidance needs a class-conditional model")
    res = run("profile", "--checkpoint", uncond_ckpt, "--n", 16, "--curve-n", 8, "--out", tmp_path / "p")
    assert res.exit_code == 0, res.output
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert prof["meta"]["T"] == 16 and len(prof["blocks"]) == 2
    res = run("tune", "--checkpoint", uncond_ckpt, "--trials", 3, "--n", 16, "--batch", 8, "--verify-n", 32, "--max-drift", "off",
              "--tolerance", 1000, "--device", "cpu", "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output
    sched = Schedule.load(tmp_path / "t" / "schedule.json")
    assert sched.sampling == SamplingSettings() and len(sched.plans) == 2


def test_passes_objective_and_drift_limit(uncond_ckpt, tmp_path):
    """Serial passes as the objective (device independent) under a per-sample drift limit."""
    import pandas as pd

    res = run("tune", "--checkpoint", uncond_ckpt, "--trials", 6, "--n", 16, "--batch", 8, "--verify-n", 256,
              "--tolerance", 1000, "--objective", "passes", "--max-drift", 2, "--device", "cpu",
              "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output
    p = Schedule.load(tmp_path / "t" / "schedule.json").provenance
    assert p["objective"] == "passes" and p["objective_value"] == pytest.approx(p["passes_per_batch"])
    assert p["fid_verify"]["proxy"]["rmse_max"] <= 2 and p["fid_verify"]["n"] == 256
    trials = pd.read_csv(tmp_path / "t" / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    assert (done.objective == done.passes / 2).all()  # passes summed over the 2 batches of 8
    assert p["objective_value"] == done[done.feasible].objective.min()
    assert "serial transformer passes per batch" in res.output and "It does not hold on this device" in res.output
    for args, text in ((["--max-drift", 1, "--verify-n", 64], "--verify-n >= 256"),
                       (["--trials", 0], "--trials, --batch and --heartbeat must be >= 1"),
                       (["--tolerance", -1], "--tolerance >= 0"), (["--objective", "speed"], "--objective must be"),
                       (["--modes", "waves"], "--modes takes"), (["--max-drift", "low"], "--max-drift takes"),
                       (["--verify-n", 64], "--verify-n >= 256")):  # the default drift limit needs 256
        one_line_error(run("tune", "--checkpoint", uncond_ckpt, "--n", 16, "--batch", 8, *args,
                           "--out", tmp_path / "u"), text)
        assert not (tmp_path / "u").exists()  # refused before any work


def test_search_space_decodes_committed_trials_into_the_exported_schedule():
    """trials.csv -> SearchSpace -> the plans that schedule.json holds, for the chosen trial."""
    import pandas as pd

    from tuner.search.space import SearchSpace
    from tuner.search.summary import StudySummary

    from .conftest import ROOT

    for study in ("mnist/tune", "mnist_p2/tune", "mnist_p2/tune_b1"):
        d = ROOT / "studies" / study
        summary = StudySummary.load(d / "summary.json")
        arch = summary.model["arch"]
        space = SearchSpace(arch["num_blocks"], (arch["img_size"] // arch["patch_size"]) ** 2)
        row = pd.read_csv(d / "trials.csv").set_index("number").loc[summary.chosen_trial].to_dict()
        assert space.plans_from_row(row) == [vars(p) for p in Schedule.load(d / "schedule.json").plans], study
        assert space.plans_from_row({"state": "FAIL"}) is None


def test_study_summary_round_trip_and_refusals(tmp_path):
    from tuner.search.summary import StudySummary

    from .conftest import ROOT

    path = ROOT / "studies" / "mnist" / "tune" / "summary.json"
    s = StudySummary.load(path)
    assert StudySummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.seeds["sequential"].latency_final["median_s"] != s.seeds["sequential"].latency_s
    doc = json.loads(path.read_text())
    for change, text in (({"version": 7}, "unknown summary version 7"), ({"extra": 1}, "unknown summary field"),
                         ({"sampling": {"guidance": -1}}, "guidance must be")):
        with pytest.raises(UserError, match=text):
            StudySummary.from_dict(doc | change)
    del doc["seeds"]
    with pytest.raises(UserError, match="missing seeds"):
        StudySummary.from_dict(doc)


def test_readme_python_snippet_runs_as_written(monkeypatch):
    """The three calls the README shows a user with their own sampling code, run verbatim."""
    import re

    from .conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### In your own code"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    x, stats, model = scope["x"], scope["stats"], scope["model"]
    assert x.shape == (16, 1, 28, 28) and torch.isfinite(x).all()
    assert stats.modes[0] == "sequential" and len(stats.modes) == model.cfg.num_blocks


def test_a_tune_that_exports_nothing_says_why_and_what_an_earlier_export_means(tmp_path):
    from tuner.search.summary import StudySummary
    from tuner.cli.verdict import nothing_exported_line

    s = StudySummary.load(ROOT / "studies" / "mnist" / "tune_passes" / "summary.json")
    s.schedule = None
    line = nothing_exported_line(s, tmp_path)
    assert "FID tolerance 10 and the drift limit" in line and "left as it was" not in line
    (tmp_path / "schedule.json").write_text("{}")
    assert "schedule.json is an earlier export of this study, left as it was" in nothing_exported_line(s, tmp_path)
    s.config["max_drift"] = None
    assert "drift limit" not in nothing_exported_line(s, tmp_path)
