"""GPU-study measurements the bench does not take (`tarflow-tuner scale steps|graphs ...`).

`steps`: what one sampler step costs on a large model, to predict schedules beyond MNIST. An
AFHQ-shaped TarFlow (256 px, patch 8: T = 1024 tokens of D = 192; width 768, 8 blocks x 8
layers) with random weights is built in memory; per batch size it times one sequential token
step against a K/V cache at a few positions, one Jacobi pass per window length at a mid
position, the one-pass bound (a full forward of one block and of the whole model), each step
both through `MetaBlock.step` (eager) and through the static-buffer solver (`tarflow.graphs`,
CUDA-graph replay on CUDA), and the K/V cache size. Random weights give the right costs, not
the right convergence: passes-to-tolerance must come from trained models.

`graphs`: latency of `sample` on a checkpoint with the eager solver and with the static one
(CUDA graphs on CUDA; optionally torch.compile), schedule by schedule, and the largest pixel
difference between the two: the project's own fast graph-captured sequential sampler, which
the issue's ">= 3x" target compares against. Each row also gets its bare-pass time: the sum
over the run's transformer passes of one static step of the same span length, timed alone;
latency / bare is the sampler overhead the issue bounds by 1.5 (bare: the faster of the eager and
the static step; on CUDA the static one is a graph replay).

Both write their JSON after every measurement, so a run stopped at its time budget keeps what it
measured.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Optional

import torch

from tarflow.checkpoint import atomic_write_text, load_checkpoint
from tarflow.errors import UserError
from tarflow.graphs import StaticSolver, StaticSolvers
from tarflow.model import TarFlow, TarFlowConfig
from tarflow.sampling import BlockSolver, make_noise, sample, state_dtype
from tarflow.solve import segment_bounds
from tarflow.schedule import resolve_schedule
from tarflow.settings import DTYPES, SamplingSettings

from tuner.measure.timing import device_info, summarize, synchronize, timed

AFHQ = TarFlowConfig(img_size=256, in_channels=3, patch_size=8, channels=768, num_blocks=8,
                     layers_per_block=8, head_dim=64, num_classes=0)
QUICK = TarFlowConfig(img_size=32, in_channels=3, patch_size=4, channels=64, num_blocks=2,
                      layers_per_block=2, head_dim=32, num_classes=0)  # T = 64: seconds on a CPU
ROUND_S = 0.05  # aim of one timed round; calls per round are sized from a first call



def per_call(fn, device, rounds: int = 3) -> float:
    """Median seconds of one call over `rounds` rounds of back-to-back calls (launch overhead
    included, one device sync per round), after two warm-up calls."""
    fn()
    _, first = timed(fn, device)
    calls = max(1, min(50, int(ROUND_S / max(first, 1e-6))))
    times = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) / calls)
    return summarize(times)["median_s"]


def windows(T: int) -> list[int]:
    """Jacobi window lengths 8, 16, ... up to T (T itself last)."""
    out, w = [], 8
    while w < T:
        out.append(w)
        w *= 2
    return out + [T]


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def step_rows(model: TarFlow, batch: int, device, compile: bool = False):
    """Yield one measurement row at a time for one batch size (see module docstring)."""
    cfg = model.cfg
    T, D = cfg.num_patches, cfg.token_dim
    block = model.blocks[0]
    dtype = model.var.dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, T, D, generator=g).to(device, dtype)
    cache = block.new_cache(batch, device, dtype)
    static = StaticSolver(block, None, batch, SamplingSettings(), device, dtype, graphs=True, compile=compile)
    pos = block.permute(block.pos_embed, 0)
    kv = 2 * cache.k.numel() * cache.k.element_size()

    xs = x.to(state_dtype(dtype))  # the static solver takes the sampler's iterates

    def row(what: str, L: int, start: int):
        reset_peak(device)
        eager = per_call(lambda: block.step(x[:, start:start + L], start, cache, pos, None), device)
        fast = per_call(lambda: static.params(xs[:, start:start + L], start), device)
        return {"batch": batch, "what": what, "tokens": L, "start": start, "eager_s": eager,
                "static_s": fast, "peak_bytes": peak_bytes(device), "kv_cache_bytes": kv}

    for start in sorted({1, T // 2, T - 2}):
        yield row("token step", 1, start)
    for w in windows(T):
        yield row("jacobi pass", w, (T - w) // 2)
    img = model.unpatchify(x)
    for what, fn in (("block forward", lambda: block(x)), ("model forward", lambda: model(img))):
        reset_peak(device)
        yield {"batch": batch, "what": what, "tokens": T, "start": 0, "eager_s": per_call(fn, device),
               "static_s": None, "peak_bytes": peak_bytes(device), "kv_cache_bytes": kv}


def span_passes(stats, schedule, T: int) -> dict[int, int] | None:
    """{span length: transformer passes} of one sampler run; None for a solver mode not known here."""
    plans = {p.block: p for p in schedule.plans}
    spans = collections.Counter()
    for k, mode, iters in zip(stats.blocks, stats.modes, stats.iters):
        if mode == "sequential":
            spans[1] += sum(iters)
        elif mode == "jacobi":  # a fallback's single-token passes count as full-span ones
            for (s, e), used in zip(segment_bounds(T, plans[k].segments), iters):
                spans[e - s] += used
        else:
            return None
    return dict(spans)


def bare_seconds(model: TarFlow, spans: dict[int, int], solvers: list, device) -> float:
    """Sum over passes of one transformer step of the same span length at a mid position, timed
    alone, by the faster of the solvers (eager and static)."""
    T, D = model.cfg.num_patches, model.cfg.token_dim
    x = torch.zeros(solvers[0].n, T, D, device=device, dtype=state_dtype(model.var.dtype))
    total = 0.0
    for L, n in spans.items():
        start = (T - L) // 2
        span = x[:, start:start + L]
        total += n * min(per_call(lambda s=s: s.params(span, start), device) for s in solvers)
    return total


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise UserError(f"--batch must be a comma list of positive integers, got {text!r}")
    return out


def check_device(device: str, dtype: str) -> torch.dtype:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def write(doc: dict, out: Optional[Path]) -> None:
    if out is not None:
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")



def measure_steps(*, device: str, dtype: str, batches: list[int], quick: bool, compile: bool,
                  out: Optional[Path]) -> dict:
    """Step costs of an AFHQ-shaped TarFlow with random weights (see the module docstring); the
    JSON is rewritten after every row so a run stopped at its budget keeps what it measured."""
    wdtype = check_device(device, dtype)
    cfg = QUICK if quick else AFHQ
    torch.manual_seed(0)
    model = TarFlow(cfg).to(device, wdtype).eval()
    doc = {"config": cfg.to_dict(), "T": cfg.num_patches, "D": cfg.token_dim, "dtype": dtype,
           "compile": compile, **device_info(device), "rows": []}
    with torch.no_grad():
        for b in batches:
            for r in step_rows(model, b, device, compile):
                doc["rows"].append(r)
                write(doc, out)
    return doc


def measure_graphs(schedules: list[str], *, checkpoint: Path, device: str, dtype: str, batch: int,
                   repeats: int, seed: int, compile: bool, out: Optional[Path]) -> dict:
    """`sample` latency per schedule with the eager solver and the static-buffer / CUDA-graph
    one, the largest difference between their samples, and the bare-pass time of each run."""
    wdtype = check_device(device, dtype)
    model = load_checkpoint(checkpoint, device=device, dtype=wdtype)
    settings = SamplingSettings(dtype=dtype)
    noise = make_noise(batch, model, seed).to(device)
    labels = settings.make_labels(batch, model, seed)
    labels = None if labels is None else labels.to(device)
    solvers = {"eager": None, "static": StaticSolvers(graphs=True)}
    if compile:
        solvers["compile"] = StaticSolvers(graphs=True, compile=True)
    bare = [cls(model.blocks[0], labels, batch, settings, device, wdtype) for cls in (BlockSolver, StaticSolvers())]
    doc = {"checkpoint": checkpoint.name, "batch": batch, "repeats": repeats, "dtype": dtype,
           **device_info(device), "rows": []}
    for spec in ["sequential", *(s for s in schedules if s != "sequential")]:
        sched = resolve_schedule(spec, model)
        ref = None
        for name, factory in solvers.items():
            kw = {} if factory is None else {"solvers": factory}
            run = lambda: sample(model, noise, sched, labels=labels, settings=settings, **kw)
            x, stats = run()  # warm-up: captures the graphs / compiles
            lat = summarize([timed(run, device)[1] for _ in range(repeats)])
            ref = x if ref is None else ref
            spans = span_passes(stats, sched, model.cfg.num_patches)
            doc["rows"].append({"schedule": spec, "solver": name, "latency": lat, "passes": stats.passes,
                                "spans": spans, "bare_s": None if spans is None else bare_seconds(model, spans, bare, device),
                                "max_abs_diff_vs_eager": (x - ref).abs().max().item()})
            write(doc, out)
    return doc
