"""Profiler on the bundled model: CRM/IGM against an independent computation, finite convergence."""

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tarflow.sampling import BlockSolver
from tarflow.settings import SamplingSettings
from tuner.cli import app
from tuner.measure.profile import calibration_batch, run_profile

from .conftest import ROOT

CALIB = ROOT / "studies" / "mnist" / "calibration.npz"


@pytest.fixture(scope="module")
def prof(model):
    x, y = calibration_batch(CALIB, 32, 0, model)
    return x, run_profile(model, x, None, curve_n=8)


def params_via_cache(block, x_block_order):
    """(a, b) of every token through the sampler's K/V-cache step (not the forward pass)."""
    n = x_block_order.shape[0]
    solver = BlockSolver(block, None, n, SamplingSettings(), x_block_order.device, x_block_order.dtype)
    a, b = solver.params(x_block_order, 0)  # outputs for tokens 1..T
    zero = torch.zeros_like(a[:, :1])
    return torch.cat([zero, a[:, :-1]], 1), torch.cat([zero, b[:, :-1]], 1)


def spec(m):
    return np.linalg.norm(m.detach().double().numpy(), ord=2)


def test_crm_and_igm_match_direct_computation(model, prof):
    x, p = prof
    with torch.no_grad():
        h = model.patchify(x)
        for k, block in enumerate(model.blocks):
            x_star = block.permute(h)
            a, b = params_via_cache(block, x_star)
            z = (x_star - b) * torch.exp(-a)
            D = x_star.shape[-1]
            W = block.proj_out.weight
            crm = spec((torch.exp(-a) * x_star).mean(0)) * spec(W[:D]) + spec(W[D:])
            row = p.blocks[p.blocks.block == k].iloc[0]
            assert row.crm == pytest.approx(crm, rel=1e-4)
            for init, x0 in (("z", z.clone()), ("zeros", torch.cat([z[:, :1], torch.zeros_like(z[:, 1:])], 1))):
                a0, b0 = params_via_cache(block, x0)
                igm = spec((z * torch.exp(a0) + b0 - x_star).mean(0))
                assert row[f"igm_{init}"] == pytest.approx(igm, rel=1e-4)
            h = block.permute(z)
    assert p.blocks.crm_share.sum() == pytest.approx(100)
    assert list(p.blocks.sampling_step) == [3, 2, 1, 0]
    assert set(p.blocks.best_init) <= {"z", "zeros"}


def test_every_curve_converges_by_its_segment_length(prof):
    _, p = prof
    c = p.curves
    assert set(c.segments) == {1, 2, 4, 8, 49}
    assert set(c.anderson) == {0, 2, 3} and set(c[c.anderson > 0].segments) == {1}
    for _, seg in c.groupby(["block", "segments", "init", "anderson", "segment"]):
        assert seg.iteration.max() <= seg.seg_len.iloc[0]
        assert seg.sort_values("iteration").error.iloc[-1] <= 1e-5


def test_iters_to_tol_is_monotone_in_tolerance(prof):
    _, p = prof
    for _, g in p.iters_to_tol.groupby(["block", "segments", "init", "anderson"]):
        g = g.sort_values("tol")
        assert list(g.iters) == sorted(g.iters, reverse=True)
        assert (g.iters >= 1).all()


def test_profile_cli_writes_tables_and_refuses_overwrite(tmp_path):
    r = CliRunner()
    args = ["profile", "--n", 16, "--curve-n", 4, "--out", tmp_path / "p"]
    res = r.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "forward order" in res.output
    table = pd.read_csv(tmp_path / "p" / "profile.csv")
    for col in ("block", "sampling_step", "crm", "crm_share", "igm_z", "igm_zeros", "best_init"):
        assert col in table
    conv = pd.read_csv(tmp_path / "p" / "convergence.csv")
    assert {"block", "segments", "init", "iteration", "error"} <= set(conv.columns)
    res = r.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = r.invoke(app, ["profile", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "q")])
    assert res.exit_code == 2 and "data not found" in res.output
