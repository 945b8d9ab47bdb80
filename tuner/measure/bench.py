"""Side-by-side sampling latency in one process on one device, against the one-pass lower bound.

Rows: the reference-style sequential sampler (K/V grown by concatenation, as public TarFlow
code), the fast sequential sampler, every schedule given, and the lower bound: one forward pass
of the whole model on the same batch (one parallel pass per block), which no inverse can beat.
Serial passes are transformer calls that must run one after another (what a latency-bound GPU
pays for); tokens processed is the total work; NFE-equivalents count that work in units of one
full-sequence pass of one block (tokens / T), so the lower bound is B passes and B NFE.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tarflow.model import TarFlow, layer_norm
from tarflow.sampling import affine_inverse, make_noise, sample, state_dtype
from tarflow.schedule import resolve_schedule
from tarflow.settings import SamplingSettings

from tuner.quality.paired import paired_proxy
from tuner.measure.timing import device_info, summarize, timed


@torch.no_grad()
def naive_sequential(model: TarFlow, noise, *, labels=None, settings: SamplingSettings = SamplingSettings()):
    """Reference-style sequential sampler, the baseline of the benchmark: K/V grown by
    `torch.cat` every step and separate conditional / unconditional passes, as public TarFlow
    code samples. Same maths as the sequential path of `tarflow.sampling.sample`, written out
    again on purpose (noise prescale, guidance mix, step): it stands for the code users start
    from, so it must not speed up when the shared step of `tarflow` does."""
    wdtype = model.var.dtype
    x = noise.to(model.var.device, state_dtype(wdtype)) * model.var.to(state_dtype(wdtype)).sqrt()
    n, T = x.shape[0], x.shape[1]
    for k in reversed(range(len(model.blocks))):
        block = model.blocks[k]
        z = block.permute(x)
        out = z.clone()
        pos = block.permute(block.pos_embed, 0)
        passes = [(block.class_embedding(labels, n), 1.0, [[] for _ in block.attn_blocks])]
        if settings.guided:
            passes.append((block.class_embedding(None, n), settings.attn_temp, [[] for _ in block.attn_blocks]))
        for i in range(T - 1):
            ab = []
            for emb, temp, caches in passes:
                h = block.proj_in(out[:, i:i + 1].to(wdtype)) + pos[i:i + 1]
                if emb is not None:
                    h = h + emb
                for layer, cache in zip(block.attn_blocks, caches):
                    att = layer.attention
                    q, kk, v = att.qkv(layer_norm(att.norm, h)).view(n, 1, 3 * att.num_heads, -1).transpose(1, 2).chunk(3, 1)
                    cache.append((kk, v))
                    K = torch.cat([c[0] for c in cache], dim=2)
                    V = torch.cat([c[1] for c in cache], dim=2)
                    y = F.scaled_dot_product_attention(q / temp, K, V)
                    h = h + att.proj(y.transpose(1, 2).reshape(n, 1, -1))
                    h = h + layer.mlp(h)
                ab.append(tuple(t.to(x.dtype) for t in block.split(block.proj_out(h))))
            (a, b) = ab[0]
            if settings.guided:
                w = settings.guidance * ((i + 1) / (T - 1) if settings.guidance_anneal else 1.0)
                (au, bu) = ab[1]
                a, b = a + w * (a - au), b + w * (b - bu)
            out[:, i + 1] = affine_inverse(z[:, i + 1], a[:, 0], b[:, 0])
        x = block.permute(out)
    return model.unpatchify(x)


def _time_interleaved(fns: dict, device, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median-of-repeats latency of each function, timed round-robin (one run of each per round)
    so that a machine that slows down or speeds up during the bench hits every row alike; with
    the load average before and after each row's runs (a busy machine shows) and, on CUDA, the
    peak memory of its timed runs. Returns (last output, stats) per name."""
    outs = {name: None for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs[name] = fn()
    cuda = torch.device(device).type == "cuda"
    runs = {name: [] for name in fns}
    load = {name: [] for name in fns}
    peak = {name: 0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            load[name].append(os.getloadavg()[0])
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            outs[name], s = timed(fn, device)
            runs[name].append(s)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    stats = {name: summarize(runs[name]) | {"loadavg_1min_before": load[name][0],
                                             "loadavg_1min_after": os.getloadavg()[0],
                                             "peak_mem_bytes": peak[name] if cuda else None}
             for name in fns}
    return outs, stats


def run_bench(model, schedules: list[str], *, batch: int, device, warmup: int = 1, repeats: int = 5,
              seed: int = 0, settings: SamplingSettings = SamplingSettings(), skip_naive: bool = False,
              force: bool = False, progress=None) -> dict:
    cfg = model.cfg
    T, B = cfg.num_patches, cfg.num_blocks
    noise = make_noise(batch, model, seed).to(device)
    labels = settings.make_labels(batch, model, seed)
    labels = None if labels is None else labels.to(device)
    run = SamplingSettings(**(settings.to_dict() | {"denoise_std": 0.0}))  # timing covers the inverse only
    seq = resolve_schedule("sequential", model)
    with torch.no_grad():
        x_in = sample(model, noise, seq, labels=labels, settings=run)[0].to(next(model.parameters()).dtype)
        y_in = labels  # the bound runs in the weights dtype on a sample-shaped input
        if run.guided:  # the guided sampler does two passes per step; so does the bound
            x_in, y_in = x_in.repeat(2, 1, 1, 1), torch.cat([labels, torch.full_like(labels, -1)])
    scheds = {spec: resolve_schedule(spec, model, force=force) for spec in schedules}
    fns = {"sequential (fast)": lambda: sample(model, noise, seq, labels=labels, settings=run)[0]}
    if not skip_naive:
        fns["sequential (reference-style)"] = lambda: naive_sequential(model, noise, labels=labels, settings=run)
    fns["one-pass lower bound"] = lambda: model(x_in, y_in)
    for spec, sched in scheds.items():
        fns[spec] = lambda sched=sched: sample(model, noise, sched, labels=labels, settings=run)
    if progress:
        progress.add_task(f"bench: {len(fns)} samplers x {repeats} interleaved rounds", total=None)
    with torch.no_grad():
        outs, stats = _time_interleaved(fns, device, warmup, repeats)
    x_seq, t_seq, t_low = outs["sequential (fast)"], stats["sequential (fast)"], stats["one-pass lower bound"]
    seq_row = {"nfe": B * (T - 1) / T, "passes": B * (T - 1), "tokens": B * (T - 1)}  # T-1 one-token steps a block
    rows = [{"name": "sequential (fast)", "latency": t_seq, **seq_row}]
    if not skip_naive:
        rows.append({"name": "sequential (reference-style)", "latency": stats["sequential (reference-style)"], **seq_row})
    rows.append({"name": "one-pass lower bound", "latency": t_low, "nfe": float(B), "passes": B, "tokens": B * T})
    for spec, sched in scheds.items():
        x, st = outs[spec]
        rows.append({"name": sched.name, "spec": spec, "latency": stats[spec], "nfe": st.nfe,
                     "passes": st.passes, "tokens": sum(st.tokens), "iters": st.iters,
                     "modes": st.modes, "fallbacks": len(st.fallbacks), "proxy": paired_proxy(x, x_seq)})
    seq_fast = t_seq["median_s"]
    naive = next((r["latency"]["median_s"] for r in rows if r["name"].endswith("reference-style)")), None)
    low = t_low["median_s"]
    for r in rows:
        m = r["latency"]["median_s"]
        r["speedup_vs_fast_sequential"] = seq_fast / m
        r["speedup_vs_reference_sequential"] = naive / m if naive else None
        r["ratio_to_lower_bound"] = m / low
    return {"model": model.fingerprint, "batch": batch, "warmup": warmup, "repeats": repeats, "timing": "interleaved",
            "sampling": settings.to_dict(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **device_info(device), "rows": rows}
