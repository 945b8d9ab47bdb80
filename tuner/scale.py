"""Cost of one transformer pass at AFHQ scale: what a sequential step, a Jacobi pass and a full
forward cost on this device, measured on random weights (timing does not depend on them).

    python -m tuner.scale --device cuda --dtype bfloat16 --out runs/scale_bf16.json

Shape: the AFHQ TarFlow (256x256x3 images, patch 8: T = 1024 tokens of 192 values; width 768,
8 blocks x 8 layers, head 64); --quick: a tiny one (32x32x3, patch 4, width 64, 2 x 2 layers).
For each batch size, on block 0 with its K/V cache: one token step (L = 1) at a few positions,
one Jacobi pass over windows L = 8, 16, ..., T starting at 0 and at T - L, one full forward of
the block and of the whole model; plus the K/V cache memory. Derived: the sequential estimate
per block ((T - 1) x the median step), the one-pass bound (the block's full forward) and the
pass cost ratio (Jacobi pass / step) per window, with the Jacobi iterations that would break
even with sequential on that window (L / ratio). Timing: warm-up, then the median of several
runs, the device synchronised before each clock read, under torch.no_grad().
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from tarflow.errors import UserError
from tarflow.model import TarFlow, TarFlowConfig

from .timing import device_info, summarize, timed

SHAPES = {
    "afhq": dict(img_size=256, in_channels=3, patch_size=8, channels=768, num_blocks=8,
                 layers_per_block=8, head_dim=64, num_classes=0),
    "quick": dict(img_size=32, in_channels=3, patch_size=4, channels=64, num_blocks=2,
                  layers_per_block=2, head_dim=32, num_classes=0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (warm-up, runs): cheap ops get more runs; a full forward is the expensive one
REPEATS = {"afhq": {"step": (3, 21), "pass": (2, 7), "forward": (1, 5)},
           "quick": {"step": (2, 9), "pass": (1, 5), "forward": (1, 3)}}


def windows(T: int) -> list[int]:
    """Jacobi window lengths 8, 16, 32, ... up to and including T."""
    out, L = [], 8
    while L < T:
        out.append(L)
        L *= 2
    return out + [T]


def build_model(shape: str, device: str, dtype: torch.dtype) -> TarFlow:
    """Random-weight TarFlow built directly on the device, blocks cast to `dtype`."""
    with torch.device(device):
        model = TarFlow(TarFlowConfig(**SHAPES[shape]))
    model.blocks.to(dtype=dtype)  # the blocks only: TarFlow.to would hash every weight first
    return model.eval()


def measure(fn, device: str, warmup: int, runs: int) -> dict:
    """Warm-up calls, then the median (and spread) of `runs` timed calls."""
    for _ in range(warmup):
        timed(fn, device)
    return summarize([timed(fn, device)[1] for _ in range(runs)])


def _cache_bytes(cache) -> int:
    return cache.k.numel() * cache.k.element_size() * 2


@torch.no_grad()
def measure_batch(model: TarFlow, batch: int, device: str, dtype: torch.dtype, reps: dict) -> dict:
    """Every timing of one batch size (block 0 for the token-level ones)."""
    cfg = model.cfg
    T, D = cfg.num_patches, cfg.token_dim
    block = model.blocks[0]
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = block.new_cache(batch, device, dtype)
    pos = block.permute(block.pos_embed, 0)
    x = torch.randn(batch, T, D, device=device, dtype=dtype)
    gen = lambda start, L: (lambda: block.step(x[:, start:start + L], start, cache, pos, None))  # noqa: E731

    steps = [{"pos": p, **measure(gen(p, 1), device, *reps["step"])} for p in sorted({0, T // 2, T - 1})]
    step_s = statistics.median(s["median_s"] for s in steps)
    jacobi = []
    for L in windows(T):
        for start in sorted({0, T - L}):
            jacobi.append({"window": L, "start": start, **measure(gen(start, L), device, *reps["pass"])})
    block_fwd = measure(lambda: block(x), device, *reps["forward"])
    img = torch.randn(batch, cfg.in_channels, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    model_fwd = measure(lambda: model(img), device, *reps["forward"])

    per_block = _cache_bytes(cache)
    ratios = []
    for L in windows(T):
        at = {j["start"]: j["median_s"] for j in jacobi if j["window"] == L}
        r0 = at[0] / step_s
        ratios.append({"window": L, "ratio_start0": r0, "ratio_end": at[T - L] / step_s,
                       "break_even_iters": L / r0})
    out = {"batch": batch, "step": steps, "step_median_s": step_s, "jacobi": jacobi,
           "block_forward": block_fwd, "model_forward": model_fwd,
           "kv_cache_bytes": {"per_block": per_block, "total": per_block * cfg.num_blocks},
           "derived": {"sequential_per_block_s": (T - 1) * step_s,
                       "sequential_model_s": (T - 1) * step_s * cfg.num_blocks,
                       "one_pass_bound_s": block_fwd["median_s"],
                       "sequential_over_one_pass": (T - 1) * step_s / block_fwd["median_s"],
                       "pass_cost_ratio": ratios}}
    if torch.device(device).type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise UserError(f"--batches takes a comma list of positive integers, got {text!r}")
    return batches


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(message)

    p = Parser(prog="python -m tuner.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--quick", action="store_true", help="tiny model instead of the AFHQ shape")
    p.add_argument("--batches", default="1,16,64", help="comma list of batch sizes")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    args.batches = parse_batches(args.batches)
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give a .json file")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return args


def run(device: str, dtype_name: str, quick: bool, batches: list[int], out: Path,
        log=print, command: str | None = None) -> dict:
    """Measure every batch size; the JSON is rewritten after each, so a timeout keeps the rest."""
    from tarflow.checkpoint import atomic_write_text

    shape = "quick" if quick else "afhq"
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = build_model(shape, device, dtype)
    cfg = model.cfg
    res = {**device_info(device), "dtype": dtype_name, "quick": quick,
           "shape": {"name": shape, **cfg.to_dict(), "T": cfg.num_patches, "token_dim": cfg.token_dim,
                     "heads": cfg.channels // cfg.head_dim,
                     "params": sum(p.numel() for p in model.parameters())},
           "windows": windows(cfg.num_patches), "repeats": REPEATS[shape],
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "command": command,
           "batches": [], "complete": False}
    for b in batches:
        try:
            r = measure_batch(model, b, device, dtype, REPEATS[shape])
        except torch.cuda.OutOfMemoryError:
            r = {"batch": b, "error": "CUDA out of memory"}
            torch.cuda.empty_cache()
        res["batches"].append(r)
        atomic_write_text(out, json.dumps(res, indent=1) + "\n")
        log(f"batch {b}: " + (r.get("error") or f"step {r['step_median_s'] * 1e3:.3f} ms, "
                              f"full block {r['block_forward']['median_s'] * 1e3:.2f} ms"))
    res["complete"] = True
    atomic_write_text(out, json.dumps(res, indent=1) + "\n")
    return res


def print_table(res: dict) -> None:
    """A small rich table: per batch, step, passes at a few windows, forwards, ratios, memory."""
    from rich.console import Console
    from rich.table import Table

    T = res["shape"]["T"]
    show = sorted({w for w in res["windows"] if w in (8, 64, T) or w == res["windows"][len(res["windows"]) // 2]})
    t = Table(title=f"{res['shape']['name']} shape (T={T}) on {res['device_name']}, {res['dtype']}, "
                    f"torch {res['torch']}; ms, median")
    for col in ["batch", "step", *[f"pass L={w}" for w in show], "block fwd", "model fwd",
                "seq est/block", "seq/1-pass", *[f"ratio L={w}" for w in show], "K/V MiB"]:
        t.add_column(col, justify="right")
    for r in res["batches"]:
        if "error" in r:
            t.add_row(str(r["batch"]), r["error"])
            continue
        at0 = {j["window"]: j["median_s"] for j in r["jacobi"] if j["start"] == 0}
        rat = {x["window"]: x["ratio_start0"] for x in r["derived"]["pass_cost_ratio"]}
        d = r["derived"]
        t.add_row(str(r["batch"]), f"{r['step_median_s'] * 1e3:.3f}", *[f"{at0[w] * 1e3:.2f}" for w in show],
                  f"{r['block_forward']['median_s'] * 1e3:.2f}", f"{r['model_forward']['median_s'] * 1e3:.1f}",
                  f"{d['sequential_per_block_s'] * 1e3:.0f}", f"{d['sequential_over_one_pass']:.0f}x",
                  *[f"{rat[w]:.1f}" for w in show], f"{r['kv_cache_bytes']['total'] / 2**20:.1f}")
    t.caption = ("step: one token (L=1), median over positions; pass: one Jacobi pass over L tokens from 0; "
                 "ratio: pass / step; seq est: (T-1) x step; K/V: cache of all blocks")
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def main(argv: list[str] | None = None) -> dict:
    """Command line: parse, measure, write --out, print the table. Bad input: one line, exit 2."""
    try:
        args = parse_args(argv)
        from .cli_options import ensure_writable

        ensure_writable(args.out)
        argv = sys.argv[1:] if argv is None else argv
        res = run(args.device, args.dtype, args.quick, args.batches, args.out,
                  command="python -m tuner.scale " + " ".join(map(str, argv)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print_table(res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
