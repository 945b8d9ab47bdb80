"""Train the `mnist-cnn` FID extractor: a small MNIST classifier whose penultimate layer is the
feature space of the fast FID used inside CPU search loops.

    tarflow-tuner train-extractor --data ../shared/data/mnist.npz \
        --out studies/mnist/fid/mnist_cnn.pt

Trains on x_train only (the reference statistics use x_test), input uint8 / 255 in [0, 1],
Adam, fixed seed; writes the state_dict and a JSON sidecar (test accuracy on all of x_test,
the command, weights sha256) through atomic writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tarflow.checkpoint import atomic_write_bytes, atomic_write_text
from tarflow.model import weights_hash
from tarflow.errors import UserError

from tuner.quality.extractors import MNIST_CNN_WEIGHTS, MnistCNN


def _arrays(data_path) -> dict:
    try:
        with np.load(data_path) as d:
            return {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except FileNotFoundError:
        raise UserError(f"data not found: {data_path}") from None
    except KeyError as e:
        raise UserError(f"{data_path} lacks array {e} (needs x_train, y_train, x_test, y_test)") from None


@torch.no_grad()
def accuracy(model: MnistCNN, x_u8: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy on uint8 N×28×28 (or N×1×28×28) images."""
    model.eval()
    x_u8 = x_u8.reshape(len(x_u8), 1, 28, 28)
    correct = 0
    for i in range(0, len(x_u8), batch):
        x = torch.from_numpy(x_u8[i:i + batch]).float() / 255
        correct += int((model(x).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x_u8)


def train_mnist_cnn(data_path, out=MNIST_CNN_WEIGHTS, *, epochs: int = 2, batch: int = 128,
                    lr: float = 2e-3, seed: int = 0, threads: int | None = None,
                    command: str | None = None) -> dict:
    """Train, evaluate on x_test, write `out` and `out.json`; returns the sidecar metadata."""
    if threads:
        torch.set_num_threads(threads)
    d = _arrays(data_path)
    x_train = torch.from_numpy(d["x_train"].reshape(-1, 1, 28, 28))
    y_train = torch.from_numpy(d["y_train"].astype(np.int64))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MnistCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx].float() / 255), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {ep + 1}/{epochs}: last loss {loss.item():.4f}, {time.time() - t0:.0f} s",
              flush=True)
    acc = accuracy(model, d["x_test"], d["y_test"].astype(np.int64))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = Path(out)
    atomic_write_bytes(out, lambda f: torch.save(state, f))
    meta = {
        "extractor": "mnist-cnn",
        "architecture": "conv3x3(32)-pool-conv3x3(64)-pool-conv3x3(64)-pool-fc128-fc10; "
                        "features = fc128 output before ReLU",
        "input": "uint8 MNIST 1x28x28 scaled to [0, 1] (x / 255), no resize",
        "train_data": f"{Path(data_path).name} x_train (60000)",
        "test_accuracy": acc,
        "test_data": f"{Path(data_path).name} x_test (all {len(d['x_test'])})",
        "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "command": command or "tarflow-tuner train-extractor",
        "weights_sha256": weights_hash(state),
        "parameters": sum(v.numel() for v in state.values()),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
