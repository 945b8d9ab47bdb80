"""Classifier-free guidance, defined once for every sampler (eager, static-buffer, CUDA graphs).

A guided sampler runs the conditional and the unconditional pass as one doubled batch: rows
[0, N) conditional, [N, 2N) unconditional (mean class embedding, optionally a different attention
temperature). Its transform parameters p = (a, b) are then mixed per token position t as

    p = p_c + w_t (p_c - p_u),   w_t = w  or, annealed,  w * t / (T - 1)

for the parameters of token t (computed at query position t - 1), so annealing reaches w at the
last token. Keeping the weights, the
query scale and the mix here means the sampler paths cannot disagree on what "guidance 2" means.
"""

from __future__ import annotations

import torch

from .settings import SamplingSettings


def guidance_weights(settings: SamplingSettings, T: int, device, dtype) -> torch.Tensor:
    """(1, T, 1) guidance weight of each span position (index = the query's position)."""
    w = torch.full((T,), settings.guidance, device=device, dtype=dtype)
    if settings.guidance_anneal:
        w = w * torch.arange(1, T + 1, device=device, dtype=dtype) / max(1, T - 1)
    return w.view(1, T, 1)


def query_scale(settings: SamplingSettings, n: int, device, dtype) -> torch.Tensor | None:
    """(2n, 1, 1, 1) query multiplier: 1 for the conditional rows, 1 / attn_temp for the
    unconditional ones; None when it would be all ones (unguided, or attn_temp 1), so the common
    case runs no extra multiply."""
    if not settings.guided or settings.attn_temp == 1.0:
        return None
    q_scale = torch.ones(2 * n, 1, 1, 1, device=device, dtype=dtype)
    q_scale[n:] = 1.0 / settings.attn_temp
    return q_scale


def guide(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the doubled batch's (a, b) (rows [0, N) conditional, [N, 2N) unconditional) into the
    guided (a, b) of N rows: p_c + w (p_c - p_u), w broadcast over (N, L, D)."""
    (ac, au), (bc, bu) = a.chunk(2), b.chunk(2)
    return ac + w * (ac - au), bc + w * (bc - bu)
