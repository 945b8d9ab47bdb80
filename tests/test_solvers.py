"""The transformer step is a runtime choice (tarflow.solvers): every solver gives the eager
sampler's samples on the bundled model, through the library and through every command that
takes --solver, and a capture that fails falls back to eager with one warning."""

import json

import pytest
import torch

from tarflow.errors import UserError
from tarflow.graphs import StaticSolver
from tarflow.sampling import make_noise, sample
from tarflow.schedule import builtin_schedule
from tarflow.settings import SamplingSettings
from tarflow.solvers import SolverChoice, default_solver

from .conftest import one_line_error, run_cli

SPECS = ["sequential", "jacobi:segments=3,max_iters=8,tol=1e-4", "frontier:window=8,tol=1e-3"]


@pytest.mark.parametrize("solver", ["static", "graphs"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_static_solvers_equal_eager(model, model64, solver, spec, guidance):
    settings = SamplingSettings(guidance=guidance)
    # float32: the static step attends over the whole preallocated cache under a mask, the eager
    # one over the prefix, so sums run in another order; the inverse (exp of the log-scale)
    # amplifies those last-bit differences token after token. Measured on this model: median
    # 1-4e-7, max 7e-6 .. 2.2e-4 (guided frontier), i.e. <= 0.03/255 in pixels.
    for m, tol_max, tol_median in ((model64, 1e-9, 1e-9), (model, 5e-4, 1e-6)):
        z, y = make_noise(6, m, 3), settings.make_labels(6, m, 3)
        sched = builtin_schedule(spec, m)
        ref, st_ref = sample(m, z, sched, labels=y, settings=settings)
        x, st = sample(m, z, sched, labels=y, settings=settings, solvers=SolverChoice(solver))
        d = (x - ref).abs()
        assert d.max().item() <= tol_max and d.median().item() <= tol_median, (m.var.dtype, spec)
        assert st.passes == st_ref.passes


def test_auto_is_eager_on_a_cpu_and_graphs_on_cuda():
    assert default_solver("cpu") == "eager" and default_solver("cuda:0") == "graphs"
    assert SolverChoice("auto", "cpu").record() == {"requested": "auto", "used": "eager", "fallback": None}
    with pytest.raises(UserError, match="solver must be one of"):
        SolverChoice("fast")


@pytest.fixture()
def broken_capture(monkeypatch):
    """Every static step fails, as a CUDA graph capture or a compilation can on a user's GPU."""
    def fail(self, x_span, start):
        raise RuntimeError("forced capture failure")
    monkeypatch.setattr(StaticSolver, "params", fail)


def test_a_failed_capture_falls_back_to_eager_once(model, broken_capture):
    z, sched = make_noise(4, model, 0), builtin_schedule("jacobi:segments=2", model)
    ref, _ = sample(model, z, sched)
    told = []
    choice = SolverChoice("graphs", on_fallback=told.append)
    x, st = sample(model, z, sched, solvers=choice)
    assert torch.equal(x, ref) and st.passes > 0
    x2, _ = sample(model, z, sched, solvers=choice)  # stays eager: no second warning
    assert torch.equal(x2, ref) and len(told) == 1 and "forced capture failure" in told[0]
    assert choice.record()["used"] == "eager" and choice.record()["requested"] == "graphs"


def test_fid_takes_the_solver_and_records_it(tmp_path):
    args = ["fid", "--n", 16, "--batch", 16, "--schedule", "jacobi:segments=2", "--json", "--device", "cpu"]
    eager = json.loads(run_cli(*args, "--solver", "eager").output)
    static = json.loads(run_cli(*args, "--solver", "static").output)
    assert static["solver"] == {"requested": "static", "used": "static", "fallback": None}
    assert static["fid"] == pytest.approx(eager["fid"], abs=1e-3)
    assert static["proxy"]["rmse_max"] < 1e-3


def test_fid_warns_in_one_line_and_carries_on_when_capture_fails(broken_capture):
    res = run_cli("fid", "--n", 16, "--batch", 16, "--schedule", "jacobi:segments=2", "--json",
                  "--device", "cpu", "--solver", "graphs")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ran eager" in warnings[0]
    assert json.loads(res.stdout)["solver"]["used"] == "eager"


def test_bench_shows_solvers_side_by_side(tmp_path):
    out = tmp_path / "b.json"
    res = run_cli("bench", "jacobi:segments=2", "--solver", "eager,static", "--batch", 2, "--repeats", 1,
                  "--warmup", 0, "--skip-reference", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"sequential (fast) · eager", "sequential (fast) · static", "jacobi:segments=2 · eager",
            "jacobi:segments=2 · static"} <= set(rows)
    assert rows["jacobi:segments=2 · static"]["solver"]["used"] == "static"
    assert rows["jacobi:segments=2 · static"]["passes"] == rows["jacobi:segments=2 · eager"]["passes"]
    assert rows["jacobi:segments=2 · static"]["proxy"]["rmse_max"] < 1e-3  # against the eager sequential


def test_device_profile_records_its_solver(tmp_path):
    res = run_cli("device-profile", "--batch", 2, "--repeats", 1, "--device", "cpu", "--solver", "static",
                  "--out", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p.json").read_text())["solver"]["used"] == "static"


@pytest.mark.parametrize("command", [["fid", "--n", 4], ["bench"], ["device-profile", "--out", "x.json"]])
def test_an_unknown_solver_is_one_line(command):
    one_line_error(run_cli(*command, "--solver", "turbo"), "--solver takes")


def test_sample_takes_the_solver(tmp_path):
    import numpy as np

    for name in ("eager", "static"):
        res = run_cli("sample", "--n", 3, "--batch", 2, "--schedule", "jacobi:segments=2", "--device", "cpu",
                      "--solver", name, "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
        assert f"{name} solver" in res.stdout
    a, b = (np.load(tmp_path / f"{n}.npz") for n in ("eager", "static"))
    assert np.abs(a["x"] - b["x"]).max() <= 5e-4
    assert json.loads(str(b["stats"]))["solver"]["used"] == "static"


def test_tune_falls_back_and_says_so_in_its_provenance(broken_capture, tmp_path):
    import numpy as np

    from tarflow.schedule import Schedule

    from .conftest import CALIB

    cal = np.load(CALIB)
    np.savez(tmp_path / "calib.npz", x=cal["x"][:8], y=cal["y"][:8])
    res = run_cli("tune", "--trials", 2, "--n", 16, "--batch", 16, "--verify-n", 32, "--max-drift", "off",
                  "--tolerance", 1000, "--device", "cpu", "--solver", "graphs", "--data", tmp_path / "calib.npz",
                  "--out", tmp_path / "study")
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("warning: graphs solver failed") for line in res.output.splitlines()) == 1
    solver = Schedule.load(tmp_path / "study" / "schedule.json").provenance["solver"]
    assert solver["requested"] == "graphs" and solver["used"] == "eager" and "forced capture failure" in solver["fallback"]
