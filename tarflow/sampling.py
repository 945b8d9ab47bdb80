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
from .model import MetaBlock, TarFlow
from .schedule import Schedule
from .settings import SamplingSettings
from .solve import SOLVERS, block_mode


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


HALF = (torch.float16, torch.bfloat16)


def state_dtype(weight_dtype):
    """Dtype of the sampler's iterates: float32 for half-precision weights, else the weights'."""
    return torch.float32 if weight_dtype in HALF else weight_dtype


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
        guess = schedule.guesses.get(k)
        calibrated = guess.tensors(x.device, x.dtype) if guess is not None else None
        xb = SOLVERS[mode](solver, block.permute(x), plan, stats, check_every, calibrated)
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
