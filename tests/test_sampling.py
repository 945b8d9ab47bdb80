"""The samplers on the bundled trained model: exactness of converged GS-Jacobi, guidance, fallback."""

import numpy as np
import pytest
import torch

from tarflow.sampling import BlockSolver, make_noise, sample
from tarflow.solve import segment_bounds
from tarflow.schedule import builtin_schedule
from tarflow.settings import SamplingSettings as Guidance

N = 4


def labels(n=N):
    return torch.arange(n) % 10


def sequential(model, noise, y=None, settings=Guidance()):
    return sample(model, noise, builtin_schedule("sequential", model), labels=y, settings=settings)


def gs_jacobi(model, noise, sched, y=None, settings=Guidance(), **kw):
    return sample(model, noise, sched, labels=y, settings=settings, **kw)


@pytest.mark.parametrize("T,S", [(49, 1), (49, 2), (49, 3), (49, 7), (49, 49), (10, 4), (5, 5)])
def test_segment_bounds_cover_every_token_once(T, S):
    b = segment_bounds(T, S)
    assert len(b) == S and b[0][0] == 0 and b[-1][1] == T
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(b, b[1:]))
    sizes = [e - s for s, e in b]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


# guidance 2 in float64 (~20 s on a busy 2-core machine) runs with `pytest -m slow`: the same guided
# path is covered in float64 by g3-anneal-temp (guidance plus annealing and temperature) and at
# guidance 1.5 and 3 by test_converged_gs_jacobi_equals_sequential_float32
GUIDES = [Guidance(), pytest.param(Guidance(guidance=2.0), marks=pytest.mark.slow),
          Guidance(guidance=3.0, guidance_anneal=True, attn_temp=0.8)]


@pytest.mark.parametrize("guide", GUIDES, ids=["g0", "g2", "g3-anneal-temp"])
def test_converged_gs_jacobi_equals_sequential_float64(model64, guide):
    T = model64.cfg.num_patches
    noise = make_noise(N, model64, seed=1)
    ref, _ = sequential(model64, noise, labels(), guide)
    for S in (1, 2, 3, 7, T):
        for init in ("zeros", "z"):
            sched = builtin_schedule(f"jacobi:segments={S},init={init},tol=0", model64)
            x, stats = gs_jacobi(model64, noise, sched, labels(), guide)
            assert (x - ref).abs().max().item() <= 1e-9, (S, init)
            assert not stats.fallbacks


@pytest.mark.parametrize("guide,bound", [(Guidance(), 1e-4), (Guidance(guidance=1.5), 1e-3), (Guidance(guidance=3.0), 1e-3)],
                         ids=["g0", "g1.5", "g3"])
def test_converged_gs_jacobi_equals_sequential_float32(model, guide, bound):
    T = model.cfg.num_patches
    noise = make_noise(N, model, seed=2)
    ref, _ = sequential(model, noise, labels(), guide)
    for S in (1, 2, 3, 7, T):
        x, _ = gs_jacobi(model, noise, builtin_schedule(f"jacobi:segments={S}", model), labels(), guide)
        assert (x - ref).abs().max().item() <= bound, S


@pytest.mark.parametrize("S,m", [(1, 2), (3, 3), (7, 1)])
def test_converged_anderson_gs_jacobi_equals_sequential_float64(model64, S, m):
    """Anderson mixing leaves the frontier token on the plain step, so L passes stay exact."""
    noise = make_noise(N, model64, seed=7)
    ref, _ = sequential(model64, noise, labels(), Guidance(guidance=1.5))
    x, stats = gs_jacobi(model64, noise, builtin_schedule(f"jacobi:segments={S},init=z,anderson={m}", model64),
                         labels(), Guidance(guidance=1.5))
    assert (x - ref).abs().max().item() <= 1e-9
    assert not stats.fallbacks


def test_long_sequence_model_converged_gs_jacobi_equals_sequential():
    """The committed T = 196 model: non-dividing segment counts stay exact on a long sequence."""
    from tarflow.checkpoint import load_checkpoint

    from .conftest import ROOT

    path = ROOT / "studies" / "mnist_p2" / "model.pth"
    m64 = load_checkpoint(path, dtype=torch.float64)
    assert m64.cfg.num_patches == 196
    noise = make_noise(2, m64, seed=9)
    ref, _ = sequential(m64, noise, labels(2), Guidance(guidance=1.5))
    # 196 = 3·65 + 1 and 13·15 + 1: uneven segments. One segment (27 of the test's 40 s here) needs
    # no uneven split; it is exact at T = 49 in test_converged_gs_jacobi_equals_sequential_float64
    for S in (3, 13):
        x, stats = gs_jacobi(m64, noise, builtin_schedule(f"jacobi:segments={S},tol=0", m64),
                             labels(2), Guidance(guidance=1.5))
        assert (x - ref).abs().max().item() <= 1e-9, S
        assert not stats.fallbacks
    m32 = load_checkpoint(path)
    ref32, _ = sequential(m32, noise.float(), labels(2))
    x32, _ = gs_jacobi(m32, noise.float(), builtin_schedule("jacobi:segments=3", m32), labels(2))
    assert (x32 - ref32).abs().max().item() <= 1e-4


def test_sequential_inverts_the_forward_pass(model64):
    noise = make_noise(N, model64, seed=3)
    x, _ = sequential(model64, noise, labels())
    z, _, _ = model64(x, labels())
    assert torch.allclose(z, noise.double() * model64.var.sqrt(), atol=1e-8)


def test_truncated_jacobi_is_not_exact_and_reports_iterations(model):
    """A budget below the segment length must change the result: the identity test is not vacuous."""
    noise = make_noise(N, model, seed=4)
    ref, _ = sequential(model, noise, labels())
    x, stats = gs_jacobi(model, noise, builtin_schedule("jacobi:segments=1,max_iters=2", model), labels())
    assert (x - ref).abs().max().item() > 1e-3
    assert stats.iters == [[2]] * model.cfg.num_blocks
    assert all(r[0] > 0 for r in stats.residuals)


def test_early_stop_uses_fewer_passes_and_stays_close(model):
    noise = make_noise(N, model, seed=5)
    ref, _ = sequential(model, noise, labels())
    x, stats = gs_jacobi(model, noise, builtin_schedule("jacobi:segments=1,tol=1e-3", model), labels())
    T = model.cfg.num_patches
    assert stats.passes < model.cfg.num_blocks * (T - 1)
    assert all(r[0] <= 1e-3 for r in stats.residuals)
    assert (x - ref).abs().max().item() < 0.1


def test_check_every_keeps_exactness(model64):
    noise = make_noise(N, model64, seed=6)
    ref, _ = sequential(model64, noise, labels())
    sched = builtin_schedule("jacobi:segments=3,tol=1e-12", model64)
    x, stats = gs_jacobi(model64, noise, sched, labels(), check_every=4)
    assert (x - ref).abs().max().item() <= 1e-9
    assert all(u <= -(-model64.cfg.num_patches // 3) for it in stats.iters for u in it)


def test_non_finite_segment_falls_back_to_sequential(model, monkeypatch):
    """Multi-token passes that blow up must be detected and re-solved token by token."""
    noise = make_noise(N, model, seed=7)
    ref, _ = sequential(model, noise, labels())
    real = BlockSolver.params

    def exploding(self, x_span, start):
        a, b = real(self, x_span, start)
        return (a + float("inf"), b) if x_span.shape[1] > 1 else (a, b)

    monkeypatch.setattr(BlockSolver, "params", exploding)
    x, stats = gs_jacobi(model, noise, builtin_schedule("jacobi:segments=2", model), labels())
    assert len(stats.fallbacks) == 2 * model.cfg.num_blocks
    assert torch.isfinite(x).all()
    assert (x - ref).abs().max().item() <= 1e-4


def test_guidance_changes_samples_and_sample_dispatches(model):
    noise = make_noise(N, model, seed=8)
    seq = builtin_schedule("sequential", model)
    x0, s0 = sample(model, noise, seq, labels=labels())
    x2, _ = sample(model, noise, seq, labels=labels(), settings=Guidance(guidance=2.0))
    assert (x0 - x2).abs().max().item() > 1e-2
    assert s0.passes == model.cfg.num_blocks * (model.cfg.num_patches - 1)


def test_denoise_moves_samples_towards_higher_likelihood(model):
    from tarflow.sampling import denoise

    noise = make_noise(N, model, seed=9)
    x, _ = sequential(model, noise, labels())
    xd = denoise(model, x, labels(), 0.1)
    with torch.no_grad():
        nll = lambda v: model.nll(*model(v, labels())[::2]).item()
        assert nll(xd) < nll(x)


def test_bfloat16_weights_keep_float32_iterates(model):
    """Half-precision option: transformer and K/V in bf16, affine update and guidance in fp32."""
    from tarflow.checkpoint import load_checkpoint
    from tuner.measure.bench import naive_sequential

    from .conftest import BUNDLED

    mbf = load_checkpoint(BUNDLED, dtype=torch.bfloat16)
    noise = make_noise(N, model, seed=8)
    ref, _ = sequential(model, noise, labels())
    x, _ = sequential(mbf, noise, labels())
    assert x.dtype == torch.float32
    rmse_255 = ((x - ref) ** 2).mean().sqrt().item() * 127.5
    assert 0 < rmse_255 < 3  # bf16 rounding shows, but stays a few grey levels
    assert (naive_sequential(mbf, noise, labels=labels()) - x).abs().max().item() <= 1e-5


def _unstable(scale):
    """The bundled model with block 3's log-scale head scaled up: exp(a) overflows where the
    inputs are far from the solution (Jacobi's early iterates), or everywhere (scale 20)."""
    from tarflow.checkpoint import load_checkpoint

    from .conftest import BUNDLED

    m = load_checkpoint(BUNDLED)
    D = m.cfg.token_dim
    with torch.no_grad():
        m.blocks[3].proj_out.weight[:D] *= scale
        m.blocks[3].proj_out.bias[:D] *= scale
    return m


def test_an_unstable_model_overflows_jacobi_and_the_fallback_recovers():
    m = _unstable(10)
    noise, y = make_noise(8, m, 0), torch.arange(8)
    ref, st_ref = sample(m, noise, builtin_schedule("sequential", m), labels=y)
    x, stats = sample(m, noise, builtin_schedule("jacobi:segments=1", m), labels=y)
    assert st_ref.failed == [] and torch.isfinite(ref).all()
    assert stats.fallbacks and stats.failed == [] and torch.isfinite(x).all()
    assert (x - ref).abs().max().item() <= 1e-4


def test_a_sample_non_finite_even_token_by_token_is_reported_not_written(tmp_path):
    from tarflow.checkpoint import save_checkpoint

    from .conftest import run_cli

    m = _unstable(20)
    _, stats = sample(m, make_noise(8, m, 0), builtin_schedule("jacobi:segments=1", m), labels=torch.arange(8))
    assert stats.failed == [2]
    save_checkpoint(m, tmp_path / "unstable.pth")
    res = run_cli("sample", "--checkpoint", tmp_path / "unstable.pth", "--n", 8, "--schedule", "jacobi:segments=1",
                  "--out", tmp_path / "s")
    assert res.exit_code == 0 and "1 sample(s) non-finite" in res.output and "sampled 7 of 8" in res.output
    out = np.load(tmp_path / "s.npz")
    assert out["x"].shape[0] == 7 and np.isfinite(out["x"]).all() and out["failed"].tolist() == [2]
