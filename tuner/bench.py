"""Side-by-side sampling latency in one process on one device, against the one-pass lower bound.

Rows: the reference-style sequential sampler (K/V grown by concatenation, as public TarFlow
code), the fast sequential sampler, every schedule given, and the lower bound: one forward pass
of the whole model on the same batch (one parallel pass per block), which no inverse can beat.
NFE-equivalents count transformer work in units of one full-sequence pass of one block
(tokens processed / T); the lower bound is B.
"""

from __future__ import annotations

import torch

from tarflow.sampling import Guidance, make_noise, naive_sequential, sample
from tarflow.schedule import resolve_schedule

from .quality import paired_proxy
from .timing import device_info, summarize, timed


def _time(fn, device, warmup: int, repeats: int):
    out = None
    for _ in range(warmup):
        out = fn()
    runs = []
    for _ in range(repeats):
        out, s = timed(fn, device)
        runs.append(s)
    return out, summarize(runs)


def run_bench(model, schedules: list[str], *, batch: int, device, warmup: int = 1, repeats: int = 5,
              seed: int = 0, guidance: Guidance = Guidance(), skip_naive: bool = False,
              force: bool = False, progress=None) -> dict:
    cfg = model.cfg
    T, B = cfg.num_patches, cfg.num_blocks
    noise = make_noise(batch, model, seed).to(device)
    labels = (torch.arange(batch) % cfg.num_classes).to(device) if cfg.num_classes else None
    rows = []
    seq = resolve_schedule("sequential", model)
    steps = len(schedules) + 3 - skip_naive
    task = progress.add_task("bench", total=steps) if progress else None

    def advance():
        if progress:
            progress.advance(task)

    x_seq, t_seq = _time(lambda: sample(model, noise, seq, labels, guidance)[0], device, warmup, repeats)
    seq_nfe = B * (T - 1) / T  # T-1 single-token passes per block
    rows.append({"name": "sequential (fast)", "latency": t_seq, "nfe": seq_nfe})
    advance()
    if not skip_naive:
        _, t_naive = _time(lambda: naive_sequential(model, noise, labels, guidance), device, warmup, repeats)
        rows.append({"name": "sequential (reference-style)", "latency": t_naive, "nfe": seq_nfe})
        advance()
    with torch.no_grad():
        x_in = x_seq.to(device)
        y_in = labels
        if guidance.active:  # the guided sampler does two passes per step; so does the bound
            x_in, y_in = x_in.repeat(2, 1, 1, 1), torch.cat([labels, torch.full_like(labels, -1)])
        _, t_low = _time(lambda: model(x_in, y_in), device, warmup, repeats)
    rows.append({"name": "one-pass lower bound", "latency": t_low, "nfe": float(B)})
    advance()
    for spec in schedules:
        sched = resolve_schedule(spec, model, force=force)
        (x, st), t = _time(lambda: sample(model, noise, sched, labels, guidance), device, warmup, repeats)
        rows.append({"name": sched.name, "spec": spec, "latency": t, "nfe": st.nfe,
                     "passes": st.passes, "iters": st.iters, "fallbacks": len(st.fallbacks),
                     "proxy": paired_proxy(x, x_seq)})
        advance()
    seq_fast = t_seq["median_s"]
    naive = next((r["latency"]["median_s"] for r in rows if r["name"].endswith("reference-style)")), None)
    low = t_low["median_s"]
    for r in rows:
        m = r["latency"]["median_s"]
        r["speedup_vs_fast_sequential"] = seq_fast / m
        r["speedup_vs_reference_sequential"] = naive / m if naive else None
        r["ratio_to_lower_bound"] = m / low
    return {"model": model.fingerprint, "batch": batch, "warmup": warmup, "repeats": repeats,
            "guidance": guidance.scale, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **device_info(device), "rows": rows}
