"""`scale steps|graphs`: the GPU-study measurements of `tuner.measure.scale`, printed as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tuner.bundled import DEFAULT_CKPT
from tuner.cli.app import app
from tuner.cli.options import user_errors

scale_app = typer.Typer(no_args_is_help=True,
                        help="GPU-study measurements: step costs of a large model, eager vs static solvers.")
app.add_typer(scale_app, name="scale")


@scale_app.command()
@user_errors
def steps(
    device: str = typer.Option("cuda", help="cpu or cuda"),
    dtype: str = typer.Option("bfloat16", help="float32, bfloat16, float16 or float64"),
    batch: str = typer.Option("1,16,64", help="comma list of batch sizes"),
    quick: bool = typer.Option(False, help="a small shape (T=64, width 64, 2x2 layers) that runs in seconds"),
    compile: bool = typer.Option(False, help="torch.compile the static step"),
    out: Optional[Path] = typer.Option(None, help="JSON written after every measurement"),
):
    """Step costs of an AFHQ-shaped TarFlow with random weights (one token step, Jacobi passes, forwards)."""
    from rich.console import Console

    from tuner.measure.scale import measure_steps, parse_batches

    doc = measure_steps(device=device, dtype=dtype, batches=parse_batches(batch), quick=quick,
                        compile=compile, out=out)
    Console(width=130).print(step_table(doc))


@scale_app.command()
@user_errors
def graphs(
    schedules: list[str] = typer.Argument(None, help="schedule files or built-in names (sequential is always timed)"),
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    device: str = typer.Option("cuda", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or float64"),
    batch: int = typer.Option(16, min=1), repeats: int = typer.Option(5, min=1), seed: int = 0,
    compile: bool = typer.Option(False, help="also time the torch.compile'd static step"),
    out: Optional[Path] = typer.Option(None, help="JSON written after every measurement"),
):
    """`sample` latency with the eager solver and the static-buffer / CUDA-graph one."""
    from rich.console import Console
    from rich.table import Table

    from tuner.measure.scale import measure_graphs

    doc = measure_graphs(schedules or [], checkpoint=checkpoint, device=device, dtype=dtype, batch=batch,
                         repeats=repeats, seed=seed, compile=compile, out=out)
    base = doc["rows"][0]["latency"]["median_s"]
    table = Table(title=f"batch {batch}, {dtype} on {doc['device_name']}: median of {repeats}")
    table.caption = "x bare: latency / (one bare transformer step per pass, timed alone); target <= 1.5"
    for col in ("schedule", "solver", "median ms", "x vs eager seq", "passes", "x bare", "max |diff|"):
        table.add_column(col, justify="right")
    for r in doc["rows"]:
        m = r["latency"]["median_s"]
        table.add_row(r["schedule"], r["solver"], f"{m * 1e3:.2f}", f"{base / m:.2f}", str(r["passes"]),
                      "-" if r["bare_s"] is None else f"{m / r['bare_s']:.2f}", f"{r['max_abs_diff_vs_eager']:.2g}")
    Console(width=130).print(table)


def step_table(doc: dict):
    from rich.table import Table

    table = Table(title=f"T={doc['T']}, D={doc['D']}, {doc['dtype']} on {doc['device_name']}")
    table.caption = "L: tokens per call; x step: eager time over the eager token step at that batch"
    for col in ("batch", "what", "L", "start", "eager ms", "static ms", "x step", "peak MiB"):
        table.add_column(col, justify="right")
    step = {r["batch"]: r["eager_s"] for r in doc["rows"] if r["what"] == "token step"}
    for r in doc["rows"]:
        ms = lambda s: "-" if s is None else f"{s * 1e3:.3f}"
        table.add_row(str(r["batch"]), r["what"], str(r["tokens"]), str(r["start"]), ms(r["eager_s"]),
                      ms(r["static_s"]), f"{r['eager_s'] / step[r['batch']]:.1f}",
                      "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}")
    return table


