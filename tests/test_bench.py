"""Benchmark plumbing: the reference-style sampler is the same maths; bench reports every row."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tarflow.sampling import make_noise, sample
from tarflow.schedule import builtin_schedule
from tarflow.settings import SamplingSettings
from tuner.measure.bench import naive_sequential
from tuner.cli import app


@pytest.mark.parametrize("guide", [SamplingSettings(), SamplingSettings(guidance=2.0, guidance_anneal=True, attn_temp=0.8)])
def test_reference_style_sequential_matches_fast_sequential(model64, guide):
    noise = make_noise(3, model64, 0)
    y = torch.tensor([1, 5, 9])
    a, _ = sample(model64, noise, builtin_schedule("sequential", model64), labels=y, settings=guide)
    b = naive_sequential(model64, noise, labels=y, settings=guide)
    assert (a - b).abs().max().item() <= 1e-9


def test_bench_cli_writes_json_with_all_rows(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "sejd", "jacobi:segments=7", "--batch", "2", "--repeats", "1",
                                   "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names[:3] == ["sequential (fast)", "sequential (reference-style)", "one-pass lower bound"]
    assert {"sejd", "jacobi:segments=7"} <= set(names)
    jac = doc["rows"][names.index("jacobi:segments=7")]
    assert jac["proxy"]["rmse_mean"] < 0.05  # converged: same samples as sequential
    assert jac["nfe"] > doc["rows"][0]["nfe"]  # parallel passes cost more tokens in total
    assert doc["device_class"] == "cpu" and doc["batch"] == 2
    low = doc["rows"][2]["latency"]["median_s"]
    fast = doc["rows"][0]["latency"]["median_s"]
    for r in doc["rows"]:  # every ratio is the one its latencies give
        assert r["ratio_to_lower_bound"] == pytest.approx(r["latency"]["median_s"] / low)
        assert r["speedup_vs_fast_sequential"] == pytest.approx(fast / r["latency"]["median_s"])


def test_bench_times_its_rows_interleaved_round_by_round():
    from tuner.measure.bench import _time_interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    outs, stats = _time_interleaved(fns, "cpu", warmup=1, repeats=2)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 2  # warm-ups, then one run of each per round
    assert outs == {"a": "a", "b": "b", "c": "c"} and all(s["runs"] == 2 for s in stats.values())
