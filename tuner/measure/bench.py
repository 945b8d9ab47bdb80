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
from tarflow.sampling import make_noise, sample, state_dtype
from tarflow.solve import affine_inverse
from tarflow.schedule import resolve_schedule
from tarflow.settings import SamplingSettings
from tarflow.solvers import SolverChoice

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


def _solver_fns(model, noise, labels, run, seq, scheds: dict, choices: list) -> dict:
    """The fast sequential sampler and every schedule, once per solver: {row name: fn}. With one
    solver the rows keep their plain names; with several each name says its solver."""
    fns = {}
    for choice in choices:
        tag = "" if len(choices) == 1 else f" · {choice.name}"
        kw = dict(labels=labels, settings=run, solvers=choice)
        fns[f"sequential (fast){tag}"] = (None, choice, lambda kw=kw: sample(model, noise, seq, **kw)[0])
        for spec, sched in scheds.items():
            fns[f"{spec}{tag}"] = (spec, choice, lambda sched=sched, kw=kw: sample(model, noise, sched, **kw))
    return fns


def _bound_input(model, noise, labels, run, seq):
    """A sample-shaped input for the one-pass bound, in the weights dtype; guided, two rows a
    sample as the guided sampler runs."""
    x_in = sample(model, noise, seq, labels=labels, settings=run)[0].to(next(model.parameters()).dtype)
    if run.guided:
        return x_in.repeat(2, 1, 1, 1), torch.cat([labels, torch.full_like(labels, -1)])
    return x_in, labels


def run_bench(model, schedules: list[str], *, batch: int, device, warmup: int = 1, repeats: int = 5,
              seed: int = 0, settings: SamplingSettings = SamplingSettings(), skip_naive: bool = False,
              force: bool = False, progress=None, solvers: list | None = None) -> dict:
    """Latencies side by side in one process (see _time_interleaved); `solvers` (SolverChoice
    objects, default eager) adds one fast-sequential row and one row per schedule for each."""
    cfg = model.cfg
    T, B = cfg.num_patches, cfg.num_blocks
    choices = solvers or [SolverChoice("eager", device)]
    noise = make_noise(batch, model, seed).to(device)
    labels = settings.make_labels(batch, model, seed)
    labels = None if labels is None else labels.to(device)
    run = SamplingSettings(**(settings.to_dict() | {"denoise_std": 0.0}))  # timing covers the inverse only
    seq = resolve_schedule("sequential", model)
    with torch.no_grad():
        x_in, y_in = _bound_input(model, noise, labels, run, seq)
    scheds = {spec: resolve_schedule(spec, model, force=force) for spec in schedules}
    rowfns = _solver_fns(model, noise, labels, run, seq, scheds, choices)
    fns = {name: fn for name, (_, _, fn) in rowfns.items()}
    if not skip_naive:
        fns["sequential (reference-style)"] = lambda: naive_sequential(model, noise, labels=labels, settings=run)
    fns["one-pass lower bound"] = lambda: model(x_in, y_in)
    if progress:
        progress.add_task(f"bench: {len(fns)} samplers x {repeats} interleaved rounds", total=None)
    with torch.no_grad():
        outs, stats = _time_interleaved(fns, device, warmup, repeats)
    first = next(iter(rowfns))  # the first solver's fast sequential: what speed-ups are against
    rows = _rows(outs, stats, rowfns, scheds, first, skip_naive, T, B)
    return {"model": model.fingerprint, "batch": batch, "warmup": warmup, "repeats": repeats, "timing": "interleaved",
            "sampling": settings.to_dict(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **device_info(device), "rows": rows}


def _rows(outs, stats, rowfns, scheds, first, skip_naive, T, B) -> list[dict]:
    x_seq = outs[first]
    seq_row = {"nfe": B * (T - 1) / T, "passes": B * (T - 1), "tokens": B * (T - 1)}  # T-1 one-token steps a block
    rows = []
    for name, (spec, choice, _) in rowfns.items():
        if spec is None:
            rows.append({"name": name, "latency": stats[name], "solver": choice.record(), **seq_row})
            continue
        x, st = outs[name]
        rows.append({"name": name if name != spec else scheds[spec].name, "spec": spec, "latency": stats[name],
                     "solver": choice.record(), "nfe": st.nfe, "passes": st.passes, "tokens": sum(st.tokens),
                     "iters": st.iters, "modes": st.modes, "fallbacks": len(st.fallbacks),
                     "proxy": paired_proxy(x, x_seq)})
    if not skip_naive:
        rows.insert(1, {"name": "sequential (reference-style)", "latency": stats["sequential (reference-style)"], **seq_row})
    rows.insert(2 - skip_naive, {"name": "one-pass lower bound", "latency": stats["one-pass lower bound"],
                                 "nfe": float(B), "passes": B, "tokens": B * T})
    seq_fast, low = stats[first]["median_s"], stats["one-pass lower bound"]["median_s"]
    naive = None if skip_naive else stats["sequential (reference-style)"]["median_s"]
    for r in rows:
        m = r["latency"]["median_s"]
        r["speedup_vs_fast_sequential"] = seq_fast / m
        r["speedup_vs_reference_sequential"] = naive / m if naive else None
        r["ratio_to_lower_bound"] = m / low
    return rows
