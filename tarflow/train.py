"""Maximum-likelihood training of a small TarFlow (AdamW, warm-up + cosine, noise augmentation)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from .checkpoint import atomic_write_bytes, save_checkpoint
from .data import load_images, to_model_space
from .errors import UserError
from .model import TarFlow, TarFlowConfig


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
    """Optimizer/generator state beside the checkpoint: `--resume` continues (or extends) a run."""
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


def train(data_path, out: Path, cfg: TarFlowConfig, tc: TrainConfig, *, resume: bool = False,
          device="cpu", quiet: bool = False) -> TarFlow:
    out = Path(out)
    u8, labels = load_images(data_path)
    if cfg.num_classes and labels is None:
        raise UserError(f"{data_path} has no labels; train unconditionally with --classes 0")
    if u8.shape[1] != cfg.in_channels or u8.shape[2] != cfg.img_size:
        cfg = TarFlowConfig(**(cfg.to_dict() | {"in_channels": u8.shape[1], "img_size": u8.shape[2]}))
    if cfg.img_size % cfg.patch_size:
        raise UserError(f"patch size {cfg.patch_size} does not divide image size {cfg.img_size}")
    x_all = to_model_space(u8)
    y_all = torch.from_numpy(labels) if labels is not None else None

    torch.manual_seed(tc.seed)
    model = TarFlow(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95),
                            weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    if resume and state_path(out).is_file():
        st = _read_state(state_path(out))
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
        if not quiet:
            print(f"resuming from step {step}")

    def checkpoint():
        meta = {"train": tc.__dict__ | {"steps_done": step, "data": Path(data_path).name}}
        save_checkpoint(model, out, meta)
        st = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
              "step": step}
        atomic_write_bytes(state_path(out), lambda f: torch.save(st, f))

    t0 = time.time()
    with Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=quiet) as prog:
        task = prog.add_task("train", total=tc.steps, completed=step, info="")
        model.train()
        while step < tc.steps:
            idx = torch.randint(len(x_all), (tc.batch,), generator=gen)
            x = x_all[idx].to(device)
            x = x + tc.noise_std * torch.randn(x.shape, generator=gen).to(device)
            y = None
            if y_all is not None and cfg.num_classes:
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
            step += 1
            bpd = (loss.item() + math.log(127.5)) / math.log(2)
            prog.update(task, completed=step, info=f"bits/dim {bpd:.3f}")
            if step % tc.ckpt_every == 0 or step == tc.steps:
                checkpoint()
    if not quiet:
        print(f"trained {step} steps in {time.time() - t0:.0f} s -> {out}")
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
