"""`train`: fit a small TarFlow on an image set (the bar is drawn here; the library reports through a callback)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tuner.cli.app import app
from tuner.cli.options import ensure_writable, progress_bar, user_errors


class TrainBar:
    """Draws training progress from `tarflow.train`'s callback; the bar appears with the first
    step, so an input error before training is still the only line printed."""

    def __init__(self):
        self.prog = self.task = None

    def __call__(self, step: int, total: int, m: dict) -> None:
        if self.prog is None:
            if m["start"]:
                typer.echo(f"resuming from step {m['start']}")
            self.prog = progress_bar()
            self.prog.start()
            self.task = self.prog.add_task("train", total=total, completed=m["start"])
        self.prog.update(self.task, completed=step, description=f"train (bits/dim {m['bpd']:.3f})")

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()


@app.command()
@user_errors
def train(
    data: Path = typer.Option(..., help="npz of uint8 images (x_train/y_train) or an image folder"),
    out: Path = typer.Option(..., help="checkpoint path (.pth); a .json sidecar is written beside it"),
    patch_size: int = 4, channels: int = 128, blocks: int = 4, layers: int = 2,
    head_dim: int = 64, classes: int = typer.Option(10, help="0 = unconditional"),
    steps: int = 3500, batch: int = 128, lr: float = 2e-3, warmup: int = 200,
    noise_std: float = 0.1, seed: int = 0, ckpt_every: int = 250,
    resume: bool = typer.Option(False, help="continue from OUT's .train.pt state"),
    device: str = "cpu",
):
    """Train a small (class-conditional) TarFlow."""
    from tarflow.model import TarFlowConfig
    from tarflow.train import TrainConfig, train as run_train

    cfg = TarFlowConfig(patch_size=patch_size, channels=channels, num_blocks=blocks,
                        layers_per_block=layers, head_dim=head_dim, num_classes=classes)
    tc = TrainConfig(steps=steps, batch=batch, lr=lr, warmup=warmup, noise_std=noise_std,
                     seed=seed, ckpt_every=ckpt_every)
    bar = TrainBar()
    try:
        run_train(data, out, cfg, tc, resume=resume, device=device, progress=bar)
    finally:
        bar.close()
    typer.echo(f"trained {tc.steps} steps -> {out}")


@app.command("train-extractor")
@user_errors
def train_extractor(
    data: Path = typer.Option(Path("../shared/data/mnist.npz"), help="npz with x_train/y_train/x_test/y_test"),
    out: Path = typer.Option(None, help="weights file [default: the bundled studies/mnist/fid/mnist_cnn.pt]"),
    epochs: int = typer.Option(2, min=1), batch: int = typer.Option(128, min=1), lr: float = 2e-3,
    seed: int = 0, threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
):
    """Train the `mnist-cnn` FID extractor (the fast features of CPU search loops) on x_train."""
    from tuner.quality.extractor_train import train_mnist_cnn
    from tuner.quality.extractors import MNIST_CNN_WEIGHTS

    out = out or MNIST_CNN_WEIGHTS
    ensure_writable(out)
    cmd = "tarflow-tuner train-extractor " + " ".join(sys.argv[2:])
    meta = train_mnist_cnn(data, out, epochs=epochs, batch=batch, lr=lr, seed=seed, threads=threads,
                           command=cmd.strip())
    typer.echo(f"test accuracy {meta['test_accuracy']:.4f} -> {out} (mnist-cnn@{meta['weights_sha256'][:8]})")
