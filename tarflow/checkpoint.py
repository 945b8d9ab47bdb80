"""Checkpoints: official-layout `.pth` state_dicts plus a small JSON sidecar.

A state_dict tells channels, blocks, layers, classes, token size and T, but not how a token
size splits into image channels x patch area, nor the head size: those come from the sidecar
`<checkpoint>.json` (or from explicit options when loading an official file that has none).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import UserError
from .model import TarFlow, TarFlowConfig

SIDECAR_KEYS = ("img_size", "in_channels", "patch_size", "head_dim")


def sidecar_path(ckpt: Path) -> Path:
    return Path(ckpt).with_suffix(".json")


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(model: TarFlow, path: Path, meta: dict | None = None) -> None:
    """Official-layout state_dict at `path`, architecture (+ free metadata) in the sidecar."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    side = {k: getattr(model.cfg, k) for k in SIDECAR_KEYS} | (meta or {})
    atomic_write_text(sidecar_path(path), json.dumps(side, indent=2, sort_keys=True) + "\n")


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/garbage files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {msg}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} is not a TarFlow state_dict")
    return obj


def infer_config(state: dict, side: dict, path: Path) -> TarFlowConfig:
    """Architecture from tensor shapes; image geometry and head size from the sidecar."""
    def need(key):
        if key not in state:
            raise UserError(f"checkpoint {path} does not match TarFlow: missing key '{key}'")
        return state[key]

    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise UserError(f"checkpoint {path} does not match TarFlow: no 'blocks.*' keys")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))}
    C, D = need("blocks.0.proj_in.weight").shape
    T = need("blocks.0.pos_embed").shape[0]
    hidden = need("blocks.0.attn_blocks.0.mlp.main.0.weight").shape[0]
    out = need("blocks.0.proj_out.weight").shape[0]
    ce = state.get("blocks.0.class_embed")
    patch = int(side["patch_size"])
    if D % (patch * patch):
        raise UserError(f"patch_size {patch} does not fit token size {D} of {path}")
    cfg = TarFlowConfig(
        img_size=int(side["img_size"]), in_channels=D // (patch * patch), patch_size=patch,
        channels=C, num_blocks=max(blocks) + 1, layers_per_block=max(layers) + 1,
        head_dim=int(side.get("head_dim", 64)), expansion=hidden // C,
        num_classes=0 if ce is None else ce.shape[0], nvp=out == 2 * D)
    if cfg.num_patches != T:
        raise UserError(f"img_size {cfg.img_size} / patch_size {patch} gives {cfg.num_patches} "
                        f"tokens but {path} has T={T}")
    return cfg


def load_checkpoint(path, *, img_size: int | None = None, patch_size: int | None = None,
                    in_channels: int | None = None, head_dim: int | None = None,
                    device="cpu", dtype=torch.float32) -> TarFlow:
    """Load a TarFlow `.pth`; explicit options override the sidecar."""
    path = Path(path)
    state = _read_state_dict(path)
    side = {}
    sp = sidecar_path(path)
    if sp.is_file():
        try:
            side = json.loads(sp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"sidecar {sp} is not valid JSON: {e}") from None
    for k, v in (("img_size", img_size), ("patch_size", patch_size),
                 ("in_channels", in_channels), ("head_dim", head_dim)):
        if v is not None:
            side[k] = v
    missing = [k for k in ("img_size", "patch_size") if k not in side]
    if missing:
        raise UserError(f"{path} has no sidecar {sp.name} giving {', '.join(missing)}: "
                        "pass --img-size and --patch-size")
    cfg = infer_config(state, side, path)
    if "in_channels" in side and int(side["in_channels"]) != cfg.in_channels:
        raise UserError(f"sidecar says in_channels={side['in_channels']} but {path} has "
                        f"{cfg.in_channels}")
    model = TarFlow(cfg)
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise UserError(f"checkpoint {path} does not match TarFlow: missing key '{k}'")
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"checkpoint {path}: key '{k}' has shape {tuple(state[k].shape)}, "
                            f"expected {tuple(v.shape)}")
    for k in state:
        if k not in expected:
            raise UserError(f"checkpoint {path} does not match TarFlow: unexpected key '{k}'")
    model.load_state_dict(state)
    model.meta = side | {"noise_std": side.get("train", {}).get("noise_std")}
    return model.to(device=device, dtype=dtype).eval()
