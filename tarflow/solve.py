"""Per-block fixed-point solvers: how one flow block is inverted as its `BlockPlan` says.

`solve_sequential` (token by token: the exact path), `solve_jacobi` (Gauss-Seidel over segments,
each by parallel Jacobi passes, optionally Anderson-mixed) and `solve_frontier` (a moving
frontier of accepted tokens). They take a block solver (`tarflow.sampling.BlockSolver` or a
static one) whose `params(x_span, start)` is the one cached transformer step, and record what
they did in the `SamplerStats`. Kept apart from `sampling` so that the driver (`sample`) reads
in one screen and the numerics of each mode in another.
"""

from __future__ import annotations

import torch

from .guess import start
from .model import exp_fp32
from .schedule import BlockPlan

ANDERSON_REG = 1e-3  # Tikhonov weight, relative to the mean diagonal of the residual Gram matrix


def segment_bounds(T: int, segments: int) -> list[tuple[int, int]]:
    """Split [0, T) into `segments` contiguous spans whose lengths differ by at most one."""
    base, extra = divmod(T, segments)
    bounds, s = [], 0
    for j in range(segments):
        e = s + base + (1 if j < extra else 0)
        bounds.append((s, e))
        s = e
    return bounds


def affine_inverse(z, a, b):
    """x = z * exp(a) + b (inverse of z = (x - b) * exp(-a)), exp in float32 at least."""
    return z * exp_fp32(a) + b


def anderson_mix(xs_hist: list, g_hist: list, exact: int):
    """Triangular Anderson mixing (after ParaTAA, arXiv 2402.09970) of Jacobi iterates.

    xs_hist / g_hist: the last h+1 inputs x_j and plain Jacobi outputs G(x_j), oldest first,
    each (N, L, D). Token t of sample n gets its own mixing weights, fitted on the residuals of
    tokens <= t only (cumulative Gram sums), so mixing never lets a token see a later one.
    Tokens [0, exact) keep the plain step: they are exact already or become exact with it,
    which keeps "a budget of L passes is exact" true.
    """
    X, G = torch.stack(xs_hist), torch.stack(g_hist)  # (h+1, N, L, D)
    F = G - X
    dF, dG = F[1:] - F[:-1], G[1:] - G[:-1]  # (h, N, L, D)
    gram = torch.einsum("inld,jnld->nlij", dF, dF).cumsum(1)  # (N, L, h, h)
    rhs = torch.einsum("inld,nld->nli", dF, F[-1]).cumsum(1)
    h = gram.shape[-1]
    eye = torch.eye(h, dtype=gram.dtype, device=gram.device)
    lam = ANDERSON_REG * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True) + torch.finfo(gram.dtype).tiny
    gamma = torch.linalg.solve(gram + lam[..., None] * eye, rhs[..., None])[..., 0]  # (N, L, h)
    mixed = G[-1] - torch.einsum("nli,inld->nld", gamma, dG)
    mixed[:, :exact] = G[-1][:, :exact]
    return mixed


def solve_segment(solver, z, x, s: int, e: int, plan: BlockPlan, carry, last: bool,
                  check_every: int = 1, record=None, guess=None, calibrated=None):
    """Jacobi passes on block-order tokens [s, e) of x (written in place); returns (carry, used, residual).

    Token s is exact before the first pass (its parameters `carry` come from the previous
    segment), so after n updates tokens s..s+n are exact and a budget of L = e - s passes
    is exact. Each pass writes the K/V of its *input*, so a segment that later segments will
    read ends on the input of its last pass (K/V consistent with the kept iterate); the last
    segment of a block needs no K/V and keeps the newest iterate. With `plan.anderson` = m the
    next iterate is Anderson-mixed over the last m passes; `residual` is always the plain
    update max |G(x) - x|, the fixed-point residual the tolerance is compared with.
    The start is `plan.init` (`tarflow.guess.start`; `calibrated` = the block's (offset, scale))
    or, when given, `guess` (N, e - s, D), which `studies/inits` uses to measure candidates; its
    first token is overwritten like any guess's, so exactness never depends on the guess.
    """
    L = e - s
    zs = z[:, s:e]
    xs = start(plan.init, zs, s, calibrated) if guess is None else guess.to(zs.dtype).clone()
    xs[:, 0] = zs[:, 0] if carry is None else affine_inverse(zs[:, 0], *carry)
    budget = min(plan.max_iters, L - 1 if last else L)
    used, residual = 0, torch.zeros((), device=z.device, dtype=z.dtype)
    xs_hist, g_hist = [], []
    for it in range(budget):
        a, b = solver.params(xs, s)
        new = torch.empty_like(xs)
        new[:, 0] = xs[:, 0]
        new[:, 1:] = affine_inverse(zs[:, 1:], a[:, :-1], b[:, :-1])
        residual = (new - xs).abs().amax()
        carry, used = (a[:, -1], b[:, -1]), it + 1
        if plan.anderson:
            xs_hist, g_hist = (xs_hist + [xs])[-plan.anderson - 1:], (g_hist + [new])[-plan.anderson - 1:]
            if len(xs_hist) > 1:
                new = anderson_mix(xs_hist, g_hist, exact=it + 2)
        if record is not None:
            record(it + 1, new)
        final_pass = it + 1 == budget
        if not final_pass and (it + 1) % check_every:
            xs = new  # no host sync on this pass
            continue
        done = final_pass or residual.item() <= plan.tol
        if done and not last:
            break  # keep xs: the cache and carry were computed from it
        xs = new
        if done:
            break
    x[:, s:e] = xs
    return carry, used, residual


@torch.no_grad()
def solve_sequential(solver, z, plan: BlockPlan, stats, check_every: int, calibrated=None):
    """Exact inverse of one block: token by token, one single-token transformer step each."""
    T = z.shape[1]
    x = z.clone()  # token 0 is its own inverse; the rest are overwritten in order
    for i in range(T - 1):
        a, b = solver.params(x[:, i:i + 1], i)
        x[:, i + 1] = affine_inverse(z[:, i + 1], a[:, 0], b[:, 0])
    stats.record(plan.block, "sequential", [1] * (T - 1), [0.0] * (T - 1), T - 1)
    return x


@torch.no_grad()
def solve_jacobi(solver, z, plan: BlockPlan, stats, check_every: int, calibrated=None):
    """One block by Gauss-Seidel over segments, each by Jacobi passes (arXiv 2505.12849).

    A segment stops once max |x_new - x| over its tokens, channels and the whole batch is
    <= plan.tol, or after plan.max_iters passes. A non-finite segment is re-solved token by
    token and reported in `stats.fallbacks`. `calibrated`: the block's (offset, scale) for
    init calibrated.
    """
    T, k = z.shape[1], plan.block
    x = torch.empty_like(z)
    carry, iters, res, tokens = None, [], [], 0
    for j, (s, e) in enumerate(segment_bounds(T, plan.segments)):
        last = e == T
        prev = carry
        carry, used, r = solve_segment(solver, z, x, s, e, plan, prev, last, check_every, calibrated=calibrated)
        tokens += used * (e - s)
        bad = not torch.isfinite(x[:, s:e]).all() or (carry is not None and not (
            torch.isfinite(carry[0]).all() and torch.isfinite(carry[1]).all()))
        if bad:  # re-solve this segment exactly, one token per pass
            stats.fallbacks.append((k, j))
            one = BlockPlan(k, 1, 1)
            carry = prev
            for t in range(s, e):
                carry, u, r = solve_segment(solver, z, x, t, t + 1, one, carry, t + 1 == T)
                used += u
                tokens += u
        iters.append(used)
        res.append(float(r))
    stats.record(k, "jacobi", iters, res, tokens)
    return x


@torch.no_grad()
def solve_frontier(solver, z, plan: BlockPlan, stats, check_every: int, calibrated=None):
    """One block by a moving frontier: tokens <= f are final, and so is their K/V.

    Each pass runs the window tokens [f, f + W) through the transformer in one call (writing
    their K/V), computes the plain Jacobi update of tokens f+1 .. f+W, and accepts the longest
    prefix whose update (max over batch and channels) is <= tol, plus the token after it: that
    one's parameters come from accepted inputs only, so its update is as exact as they are and
    every pass advances at least one token. Accepted tokens before the new frontier keep the
    pass's input (their K/V was computed from it; it is within tol of its update); the new
    frontier token takes its update and gets its K/V at the start of the next pass; tokens past
    it keep their update as the next warm start. With tol = 0 only exactly-fixed inputs are
    accepted, so every kept token equals the sequential sampler's.

    Bound: after plan.max_iters passes the tokens past the frontier keep their latest iterate,
    as a spent Jacobi budget does. A non-finite pass re-solves the rest token by token
    (stats.fallbacks). Host reads: one per pass (the accepted length and a finiteness flag in
    one transfer); the frontier itself lives on the host.
    """
    T, W = z.shape[1], plan.window
    x = start(plan.init, z, 0, calibrated)
    x[:, 0] = z[:, 0]
    f, passes, tokens, residual = 0, 0, 0, 0.0
    while f < T - 1 and passes < plan.max_iters:
        e = min(f + W, T - 1)  # inputs f .. e-1 give the updates of tokens f+1 .. e
        a, b = solver.params(x[:, f:e], f)
        new = affine_inverse(z[:, f + 1:e + 1], a, b)
        upd = (new - x[:, f + 1:e + 1]).abs().amax(dim=(0, 2))  # per token
        ok = (upd <= plan.tol).int().cumprod(0).sum()
        accepted, finite, residual = torch.stack([ok.to(upd.dtype), torch.isfinite(new).all().to(upd.dtype),
                                                  upd.max()]).tolist()
        passes, tokens = passes + 1, tokens + (e - f)
        if not finite:  # re-solve the rest exactly, one token per pass
            stats.fallbacks.append((plan.block, f))
            for t in range(f, T - 1):
                a, b = solver.params(x[:, t:t + 1], t)
                x[:, t + 1] = affine_inverse(z[:, t + 1], a[:, 0], b[:, 0])
            passes, tokens, f, residual = passes + T - 1 - f, tokens + T - 1 - f, T - 1, 0.0
            break
        m = min(int(accepted) + 1, e - f)
        x[:, f + m:e + 1] = new[:, m - 1:]
        f += m
    stats.record(plan.block, "frontier", [passes], [residual], tokens)
    return x


def block_mode(plan: BlockPlan, T: int) -> str:
    """Which solver runs a block: its plan's mode; one token per segment is the sequential path."""
    if plan.mode == "frontier":
        return "frontier"
    return "sequential" if plan.segments == T else "jacobi"


SOLVERS = {"sequential": solve_sequential, "jacobi": solve_jacobi, "frontier": solve_frontier}
