"""Frontier mode on the bundled trained model: exact at tol 0, fewer passes with a tolerance,
its pass bound, the non-finite fallback, half precision, and the schema-3 schedule file."""

import json

import pytest
import torch

from tarflow.errors import UserError
from tarflow.sampling import BlockSolver, make_noise, sample
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule
from tarflow.settings import SamplingSettings

from .conftest import ROOT, one_line_error, run_cli

GUIDED = SamplingSettings(guidance=2.0, guidance_anneal=True, attn_temp=0.8)
Y = torch.tensor([0, 3, 7, 9])


def run(model, spec, settings=SamplingSettings(), seed=0):
    noise = make_noise(4, model, seed)
    return sample(model, noise, builtin_schedule(spec, model), labels=Y, settings=settings)


@pytest.mark.parametrize("settings", [SamplingSettings(), GUIDED], ids=["g0", "g2-anneal-temp"])
def test_tol_zero_reproduces_the_sequential_sampler_float64(model64, settings):
    ref, _ = run(model64, "sequential", settings)
    for window in (1, 2, 7, 16, 49):
        for init in ("zeros", "z"):
            x, stats = run(model64, f"frontier:window={window},init={init}", settings)
            assert (x - ref).abs().max().item() <= 1e-9, (window, init)
            assert stats.modes == ["frontier"] * 4


@pytest.mark.parametrize("settings,bound", [(SamplingSettings(), 1e-4), (SamplingSettings(guidance=1.5), 1e-3)])
def test_tol_zero_reproduces_the_sequential_sampler_float32(model, settings, bound):
    ref, _ = run(model, "sequential", settings)
    for window in (3, 16, 49):
        x, _ = run(model, f"frontier:window={window}", settings)
        assert (x - ref).abs().max().item() <= bound, window


def test_a_tolerance_saves_passes_and_stays_close(model):
    ref, seq = run(model, "sequential")
    x, stats = run(model, "frontier:window=16,tol=1e-3")
    assert stats.passes < seq.passes / 2
    assert sum(stats.tokens) <= stats.passes * 16
    assert ((x - ref) * 127.5).pow(2).mean().sqrt().item() < 1.0  # pixel RMSE on the 0-255 scale


def test_the_pass_bound_stops_a_block_where_it_is(model):
    ref, _ = run(model, "sequential")
    x, stats = run(model, "frontier:window=8,max_passes=3")
    assert stats.iters == [[3]] * 4 and stats.passes == 12
    assert (x - ref).abs().max().item() > 1e-2  # three passes of 8 tokens cannot reach token 48


def test_a_non_finite_pass_falls_back_to_exact_steps(model, monkeypatch):
    ref, _ = run(model, "sequential")
    real = BlockSolver.params

    def exploding(self, x_span, start):
        a, b = real(self, x_span, start)
        return (a + float("inf"), b) if x_span.shape[1] > 1 else (a, b)

    monkeypatch.setattr(BlockSolver, "params", exploding)
    x, stats = run(model, "frontier:window=16,tol=1e-3")
    assert len(stats.fallbacks) == 4 and torch.isfinite(x).all()
    assert (x - ref).abs().max().item() <= 1e-4


def test_half_precision_weights_keep_float32_iterates():
    from tarflow.checkpoint import load_checkpoint

    from .conftest import BUNDLED

    mbf = load_checkpoint(BUNDLED, dtype=torch.bfloat16)
    ref, _ = run(mbf, "sequential")
    x, _ = run(mbf, "frontier:window=16")
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    rmse_255 = ((x - ref) * 127.5).pow(2).mean().sqrt().item()
    assert rmse_255 < 3  # bf16 rounding of window vs one-token passes: a few grey levels at most


def test_schema_3_round_trip_and_older_files(tmp_path, model):
    plans = (BlockPlan(3, 1, 40, "z", 1e-3, mode="frontier", window=16),) + tuple(
        builtin_schedule("sejd", model).plans[1:])
    sched = Schedule(plans=plans, fingerprint=model.fingerprint, name="mixed")
    sched.save(tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["schema_version"] == 3
    assert doc["blocks"][0] == {"block": 3, "mode": "frontier", "window": 16, "max_iters": 40, "init": "z", "tol": 1e-3}
    assert "mode" not in doc["blocks"][1] and "window" not in doc["blocks"][1]  # a segments plan reads as in v2
    assert Schedule.load(tmp_path / "s.json").plans == plans
    x, stats = sample(model, make_noise(2, model, 1), sched, labels=Y[:2])
    assert stats.modes == ["frontier", "jacobi", "jacobi", "jacobi"]
    with pytest.raises(UserError, match=r"blocks\[0\]: missing 'window'"):
        Schedule.from_dict({**doc, "blocks": [{"block": 0, "max_iters": 2, "mode": "frontier"}]})
    for old in ("studies/mnist/tune/schedule.json", "studies/mnist_p2/tune/seeds/paper.json"):  # v1, v2
        assert all(p.mode == "segments" for p in Schedule.load(ROOT / old).plans)


@pytest.mark.parametrize("spec,text", [
    ("frontier:window=0", "window >= 1"), ("frontier:window=50", "window=50 exceeds the sequence length"),
    ("frontier:tol=-1", "tol must be"), ("frontier:max_passes=0", "max_iters must be >= 1"),
    ("frontier:init=ones", "unknown init"), ("frontier:segments=2", "unknown parameter 'segments'"),
])
def test_frontier_spec_errors_are_one_line(tmp_path, spec, text):
    one_line_error(run_cli("sample", "--n", 1, "--schedule", spec, "--out", tmp_path / "s"), text)


def test_plans_refuse_fields_of_the_other_mode():
    with pytest.raises(UserError, match="window applies to mode 'frontier' only"):
        BlockPlan(0, 2, 2, window=4)
    with pytest.raises(UserError, match="takes neither segments nor anderson"):
        BlockPlan(0, 2, 2, mode="frontier", window=4)
    with pytest.raises(UserError, match="unknown mode"):
        BlockPlan(0, 1, 2, mode="waves")
