"""Samplers: plain functions over (model, noise, schedule) with one signature.

`sample(model, noise, schedule, *, labels, settings, callback)` inverts the flow block by block
(blocks B-1 first). Each block is solved as its `BlockPlan` says: token by token with a K/V
cache when segments = T (the exact sequential path), else segment by segment (Gauss-Seidel),
every segment by parallel Jacobi fixed-point passes (arXiv 2505.12849). All paths share one
K/V-cached transformer step (`MetaBlock.run`), one definition of classifier-free guidance
(`tarflow.guidance`) and the optional score-based denoising step, so their outputs are comparable
bit for bit.

Conventions: noise is (N, T, D) standard normal in image token order, scaled by sqrt(var) before
the last block is inverted (`prior_latents`, as the official `Model.reverse`). Inside a block everything runs in
that block's token order (flipped for odd blocks). `callback`, when given, is called after each
block with {"block": forward index, "mode": "sequential" | "jacobi", "x": block-order iterate}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .guidance import guidance_weights, guide, query_scale
from .model import MetaBlock, TarFlow, exp_fp32
from .schedule import BlockPlan, Schedule
from .settings import SamplingSettings


@dataclass
class SamplerStats:
    """Per block in sampling order: forward index, solver, passes per segment, residuals, fallbacks."""

    T: int = 1
    blocks: list[int] = field(default_factory=list)
    iters: list[list[int]] = field(default_factory=list)
    residuals: list[list[float]] = field(default_factory=list)
    fallbacks: list[tuple[int, int]] = field(default_factory=list)  # (forward block, segment)
    tokens: list[int] = field(default_factory=list)  # query tokens pushed through the transformer
    modes: list[str] = field(default_factory=list)  # solver that ran each block
    failed: list[int] = field(default_factory=list)  # samples non-finite even when solved token by token
    calls: list[dict[int, int]] = field(default_factory=list)  # per block: pass width (tokens) -> passes

    def record(self, block: int, mode: str, iters: list[int], residuals: list[float], tokens: int):
        self.blocks.append(block)
        self.modes.append(mode)
        self.iters.append(iters)
        self.residuals.append(residuals)
        self.tokens.append(tokens)

    @property
    def nfe(self) -> float:
        """Work in units of one full-sequence pass of one block (tokens / T)."""
        return sum(self.tokens) / self.T if self.tokens else 0.0

    @property
    def passes(self) -> int:
        """Transformer passes over all blocks and segments (sequential: B * (T - 1))."""
        return sum(sum(i) for i in self.iters)

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "modes": self.modes, "failed": self.failed, "iters": self.iters, "residuals": self.residuals,
                "fallbacks": [list(f) for f in self.fallbacks], "passes": self.passes,
                "nfe": self.nfe, "calls": [{str(w): n for w, n in c.items()} for c in self.calls]}


def make_noise(n: int, model: TarFlow, seed: int) -> torch.Tensor:
    """(n, T, D) float32 standard-normal latents from a CPU generator: same on every device.

    Unscaled on purpose (a seed means the same noise for any model of that shape);
    `prior_latents` applies the model's prior."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.cfg.num_patches, model.cfg.token_dim, generator=g)


def prior_latents(model: TarFlow, noise) -> torch.Tensor:
    """Standard-normal noise (N, T, D) -> latents of the model's prior N(0, var): the one place
    the noise is scaled (as the official `Model.reverse`), on the model's device in the sampler's
    state dtype (float32 for half-precision weights)."""
    sdt = state_dtype(model.var.dtype)
    return noise.to(model.var.device, sdt) * model.var.to(sdt).sqrt()


def segment_bounds(T: int, segments: int) -> list[tuple[int, int]]:
    """Split [0, T) into `segments` contiguous spans whose lengths differ by at most one."""
    base, extra = divmod(T, segments)
    bounds, s = [], 0
    for j in range(segments):
        e = s + base + (1 if j < extra else 0)
        bounds.append((s, e))
        s = e
    return bounds


class BlockSolver:
    """Everything needed to run one block's transformer step during sampling.

    With guidance the batch is doubled (rows [0, N) conditional, [N, 2N) unconditional) so both
    passes are one batched call; `params` folds them back into guided (a, b).
    """

    def __init__(self, block: MetaBlock, labels, n: int, settings: SamplingSettings, device, dtype):
        self.block, self.n, self.guided, self.dtype = block, n, settings.guided, dtype
        T = block.pos_embed.shape[0]
        rows = 2 * n if self.guided else n
        self.cache = block.new_cache(rows, device, dtype)
        self.pos = block.permute(block.pos_embed, 0)
        self.class_emb = None
        if block.class_embed is not None:
            cond = block.class_embedding(labels, n)
            self.class_emb = torch.cat([cond, block.class_embedding(None, n)]) if self.guided else cond
        self.q_scale = query_scale(settings, n, device, dtype)
        self.w = guidance_weights(settings, T, device, state_dtype(dtype))

    def params(self, x_span, start: int):
        """(a, b) for tokens start+1 .. start+L, writing the span's K/V into the cache.

        The transformer runs in the weights' dtype; (a, b) come back in the iterate's dtype, so
        with half-precision weights the guidance mix and the affine update stay in float32."""
        state = x_span.dtype
        if self.guided:
            x_span = x_span.repeat(2, 1, 1)
        a, b = self.block.step(x_span.to(self.dtype), start, self.cache, self.pos, self.class_emb, self.q_scale)
        a, b = a.to(state), b.to(state)
        if self.guided:
            a, b = guide(a, b, self.w[:, start:start + a.shape[1]])
        return a, b


class CountedSolver:
    """Counts a solver's passes by width: what a device cost model (tuner.measure.device_profile) prices.
    Widths are Python ints, so counting costs no device sync."""

    def __init__(self, solver):
        self.solver, self.calls = solver, {}

    def params(self, x_span, start: int):
        L = x_span.shape[1]
        self.calls[L] = self.calls.get(L, 0) + 1
        return self.solver.params(x_span, start)


def affine_inverse(z, a, b):
    """x = z * exp(a) + b (inverse of z = (x - b) * exp(-a)), exp in float32 at least."""
    return z * exp_fp32(a) + b


HALF = (torch.float16, torch.bfloat16)


def state_dtype(weight_dtype):
    """Dtype of the sampler's iterates: float32 for half-precision weights, else the weights'."""
    return torch.float32 if weight_dtype in HALF else weight_dtype


ANDERSON_REG = 1e-3  # Tikhonov weight, relative to the mean diagonal of the residual Gram matrix


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


def solve_segment(solver: BlockSolver, z, x, s: int, e: int, plan: BlockPlan, carry, last: bool,
                  check_every: int = 1, record=None):
    """Jacobi passes on block-order tokens [s, e) of x (written in place); returns (carry, used, residual).

    Token s is exact before the first pass (its parameters `carry` come from the previous
    segment), so after n updates tokens s..s+n are exact and a budget of L = e - s passes
    is exact. Each pass writes the K/V of its *input*, so a segment that later segments will
    read ends on the input of its last pass (K/V consistent with the kept iterate); the last
    segment of a block needs no K/V and keeps the newest iterate. With `plan.anderson` = m the
    next iterate is Anderson-mixed over the last m passes; `residual` is always the plain
    update max |G(x) - x|, the fixed-point residual the tolerance is compared with.
    """
    L = e - s
    zs = z[:, s:e]
    xs = zs.clone() if plan.init == "z" else torch.zeros_like(zs)
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
def solve_sequential(solver: BlockSolver, z, plan: BlockPlan, stats: SamplerStats, check_every: int):
    """Exact inverse of one block: token by token, one single-token transformer step each."""
    T = z.shape[1]
    x = z.clone()  # token 0 is its own inverse; the rest are overwritten in order
    for i in range(T - 1):
        a, b = solver.params(x[:, i:i + 1], i)
        x[:, i + 1] = affine_inverse(z[:, i + 1], a[:, 0], b[:, 0])
    stats.record(plan.block, "sequential", [1] * (T - 1), [0.0] * (T - 1), T - 1)
    return x


@torch.no_grad()
def solve_jacobi(solver: BlockSolver, z, plan: BlockPlan, stats: SamplerStats, check_every: int):
    """One block by Gauss-Seidel over segments, each by Jacobi passes (arXiv 2505.12849).

    A segment stops once max |x_new - x| over its tokens, channels and the whole batch is
    <= plan.tol, or after plan.max_iters passes. A non-finite segment is re-solved token by
    token and reported in `stats.fallbacks`.
    """
    T, k = z.shape[1], plan.block
    x = torch.empty_like(z)
    carry, iters, res, tokens = None, [], [], 0
    for j, (s, e) in enumerate(segment_bounds(T, plan.segments)):
        last = e == T
        prev = carry
        carry, used, r = solve_segment(solver, z, x, s, e, plan, prev, last, check_every)
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
def solve_frontier(solver: BlockSolver, z, plan: BlockPlan, stats: SamplerStats, check_every: int):
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
    x = z.clone() if plan.init == "z" else torch.zeros_like(z)
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


@torch.no_grad()
def sample(model: TarFlow, noise, schedule: Schedule, *, labels=None,
           settings: SamplingSettings = SamplingSettings(), callback=None,
           check_every: int | None = None, solvers=BlockSolver):
    """Invert the flow for `noise` (N, T, D) as `schedule` says; returns (images, SamplerStats).

    labels: (N,) class indices (-1 = unconditional) or None; `settings.make_labels` makes them
    from the label policy. The model runs in its own dtype (`settings.dtype` is what loaders
    cast it to). `check_every` > 1 reads a segment's convergence flag back from the device only
    every few passes (extra passes only move closer to the fixed point); default: 1 on CPU,
    4 on CUDA. The denoising step runs when settings.denoise_std > 0. A sample that is still
    non-finite after the token-by-token fallbacks is listed in `stats.failed` (one host read).
    `solvers` builds each block's transformer step from BlockSolver's arguments
    (`tarflow.solvers.SolverChoice("graphs")`: static buffers and CUDA graphs). If it fails and
    the factory can `fall_back` (a SolverChoice), the sample is redone from its start eagerly.
    """
    try:
        return _sample(model, noise, schedule, labels, settings, callback, check_every, solvers)
    except Exception as e:
        fall_back = getattr(solvers, "fall_back", None)
        if fall_back is None or not fall_back(e):
            raise
    return _sample(model, noise, schedule, labels, settings, callback, check_every, solvers)


def _sample(model, noise, schedule, labels, settings, callback, check_every, solvers):
    plans = {p.block: p for p in schedule.plans}
    T = model.cfg.num_patches
    stats = SamplerStats(T=T)
    if check_every is None:
        check_every = 4 if model.var.is_cuda else 1
    wdtype = model.var.dtype
    x = prior_latents(model, noise)
    n = x.shape[0]
    if labels is not None:
        labels = labels.to(x.device)
    for k in reversed(range(len(model.blocks))):
        block, plan = model.blocks[k], plans[k]
        solver = CountedSolver(solvers(block, labels, n, settings, x.device, wdtype))
        mode = block_mode(plan, T)
        xb = SOLVERS[mode](solver, block.permute(x), plan, stats, check_every)
        stats.calls.append(solver.calls)
        if callback:
            callback({"block": k, "mode": mode, "x": xb})
        x = block.permute(xb)
    x = model.unpatchify(x)
    if settings.denoise_std > 0:
        x = denoise(model, x, labels, settings.denoise_std)
    stats.failed = (~torch.isfinite(x.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
    return x, stats


@torch.enable_grad()
def denoise(model: TarFlow, x, labels=None, noise_std: float = 0.1):
    """One score step (Tweedie): x + sigma^2 * grad log p(x), undoing training noise augmentation."""
    x = x.detach().to(model.var.dtype).clone().requires_grad_(True)
    z, _, logdet = model(x, labels)
    D = z.shape[1] * z.shape[2]
    # per-sample negative log-density = D * (0.5 mean z^2 - mean logdet) + const
    neg_logp = D * (0.5 * z.pow(2).mean(dim=[1, 2]) - logdet)
    (grad,) = torch.autograd.grad(neg_logp.sum(), x)
    return (x - noise_std**2 * grad).detach()


def sample_batched(model: TarFlow, schedule: Schedule, noise, labels=None, *,
                   settings: SamplingSettings = SamplingSettings(), batch: int = 500, solvers=BlockSolver):
    """`sample` over `noise` in batches (memory), images gathered on the CPU; returns
    (images, per-batch SamplerStats)."""
    xs, stats = [], []
    for i in range(0, len(noise), batch):
        lab = None if labels is None else labels[i:i + batch]
        x, st = sample(model, noise[i:i + batch], schedule, labels=lab, settings=settings, solvers=solvers)
        xs.append(x.cpu())
        stats.append(st)
    return torch.cat(xs), stats
