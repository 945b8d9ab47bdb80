"""Maximum-likelihood training of a small TarFlow (AdamW, warm-up + cosine, noise augmentation).

`train` prints nothing and draws no progress bar: it is a library function, and a front end (the
CLI's bar, a notebook, a log file) gets every step through the `progress` callback instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .data import load_images, to_model_space
from .errors import UserError
from .io import atomic_write_bytes
from .model import TarFlow, TarFlowConfig

# progress(step, total, metrics) after every optimiser step; step counts from 1 (resumed runs
# continue the count), metrics: see `train`
Progress = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3500
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 1e-4
    noise_std: float = 0.1  # Gaussian noise added to model-space images (dequantisation)
    drop_label: float = 0.1  # fraction of labels replaced by "unconditional" for guidance
    ckpt_every: int = 250
    seed: int = 0


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def state_path(out: Path) -> Path:
    """Optimizer/generator state beside the checkpoint: `resume=True` continues (or extends) a run."""
    return out.with_suffix(".train.pt")


def _read_state(path: Path) -> dict:
    """The resume state, loaded without unpickling arbitrary objects (a crafted file cannot run code)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot resume from {path}: not a plain training state ({first})") from None
    if not isinstance(st, dict) or not {"model", "opt", "gen", "step"} <= set(st):
        raise UserError(f"cannot resume from {path}: not a training state written by `train`")
    return st


def _training_data(data_path, cfg: TarFlowConfig):
    """(config fitted to the images' channels and size, model-space images, labels or None)."""
    u8, labels = load_images(data_path)
    if cfg.num_classes and labels is None:
        raise UserError(f"{data_path} has no labels; train unconditionally with num_classes=0",
                        setting="num_classes")
    if u8.shape[1] != cfg.in_channels or u8.shape[2] != cfg.img_size:
        cfg = TarFlowConfig(**(cfg.to_dict() | {"in_channels": u8.shape[1], "img_size": u8.shape[2]}))
    if cfg.img_size % cfg.patch_size:
        raise UserError(f"patch_size {cfg.patch_size} does not divide the image size {cfg.img_size}",
                        setting="patch_size")
    return cfg, to_model_space(u8), torch.from_numpy(labels) if labels is not None else None


def _step(model: TarFlow, opt, gen, x_all, y_all, step: int, tc: TrainConfig, device):
    """One optimiser step on a fresh batch (noise-augmented, labels dropped for guidance); returns
    the loss tensor. Every random draw comes from `gen`, so a resumed run repeats it exactly."""
    idx = torch.randint(len(x_all), (tc.batch,), generator=gen)
    x = x_all[idx].to(device)
    x = x + tc.noise_std * torch.randn(x.shape, generator=gen).to(device)
    y = None
    if y_all is not None and model.cfg.num_classes:
        y = y_all[idx].to(device)
        drop = torch.rand(tc.batch, generator=gen).to(device) < tc.drop_label
        y = torch.where(drop, torch.full_like(y, -1), y)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, tc)
    z, _, logdet = model(x, y)
    loss = model.nll(z, logdet)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.update_prior(z)
    return loss.detach()


def _save(model: TarFlow, opt, gen, step: int, out: Path, tc: TrainConfig, data_path) -> None:
    """The checkpoint (+ sidecar) and the resume state beside it."""
    meta = {"train": tc.__dict__ | {"steps_done": step, "data": Path(data_path).name}}
    save_checkpoint(model, out, meta)
    st = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step}
    atomic_write_bytes(state_path(out), lambda f: torch.save(st, f))


def train(data_path, out: Path, cfg: TarFlowConfig, tc: TrainConfig, *, resume: bool = False,
          device="cpu", progress: Progress | None = None) -> TarFlow:
    """Train on `data_path` (see `load_images`), checkpointing to `out` every tc.ckpt_every steps
    and at the end; returns the model in eval mode. Prints nothing.

    resume: continue from `state_path(out)` when it exists (the same steps, bit for bit).
    progress(step, total, metrics), when given, is called after every step: step 1..total,
    total = tc.steps, metrics = {"loss": mean NLL in nats/dim, "bpd": bits/dim on the 0..255
    scale, "lr": the step's learning rate, "start": the step this call began at (> 0 when
    resumed), "elapsed": seconds since this call began, "saved": whether a checkpoint was just
    written}. Without it no loss is read back from the device."""
    out = Path(out)
    cfg, x_all, y_all = _training_data(data_path, cfg)
    torch.manual_seed(tc.seed)
    model = TarFlow(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    if resume and state_path(out).is_file():
        st = _read_state(state_path(out))
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
    start, t0 = step, time.perf_counter()
    model.train()
    while step < tc.steps:
        loss = _step(model, opt, gen, x_all, y_all, step, tc, device)
        step += 1
        saved = step % tc.ckpt_every == 0 or step == tc.steps
        if saved:
            _save(model, opt, gen, step, out, tc, data_path)
        if progress is not None:
            nats = loss.item()
            progress(step, tc.steps, {"loss": nats, "bpd": (nats + math.log(127.5)) / math.log(2),
                                      "lr": lr_at(step - 1, tc), "start": start,
                                      "elapsed": time.perf_counter() - t0, "saved": saved})
    return model.eval()


@torch.no_grad()
def evaluate_bpd(model: TarFlow, u8: np.ndarray, labels=None, batch: int = 500) -> float:
    """Test-set bits/dim of 8-bit images (uniform dequantisation noise in pixel units)."""
    gen = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    for i in range(0, len(u8), batch):
        x = torch.from_numpy(u8[i:i + batch]).float()
        x = (x + torch.rand(x.shape, generator=gen)) / 128 - 1  # uniform dequantisation
        y = None if labels is None or not model.cfg.num_classes else torch.from_numpy(labels[i:i + batch])
        z, _, logdet = model(x.to(model.var.device, model.var.dtype), y)
        # model space is u/128 - 1 here, so the pixel-space correction is log(128)
        nll = (0.5 * z.pow(2).mean(dim=[1, 2]) + 0.5 * math.log(2 * math.pi) - logdet + math.log(128))
        total += nll.sum().item()
        n += len(x)
    return total / n / math.log(2)
