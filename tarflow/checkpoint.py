"""Checkpoints: official-layout `.pth` state_dicts plus a small JSON sidecar.

A state_dict tells channels, blocks, layers, classes, token size and T, but not how a token
size splits into image channels x patch area, nor the head size: those come from the sidecar
`<checkpoint>.json` (or from explicit options when loading an official file that has none).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_text, read_json  # noqa: F401  (re-export until tuner imports tarflow.io)
from .model import TarFlow, TarFlowConfig

SIDECAR_KEYS = ("img_size", "in_channels", "patch_size", "head_dim")


def sidecar_path(ckpt: Path) -> Path:
    return Path(ckpt).with_suffix(".json")


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


OFFICIAL_NAME = re.compile(r"^(?P<data>.+)_model_(?P<patch>\d+)_(?P<channels>\d+)_(?P<blocks>\d+)_"
                           r"(?P<layers>\d+)_(?P<noise>[^_]+)$")
DEFAULT_HEAD_DIM = 64  # every official TarFlow checkpoint


def parse_official_name(path: Path) -> dict | None:
    """`<data>_model_<patch>_<channels>_<blocks>_<layers>_<noise>.pth` -> its fields, else None.

    The noise field is the training noise std, or a word (e.g. `uniform`): then None."""
    m = OFFICIAL_NAME.match(Path(path).stem)
    if m is None:
        return None
    try:
        noise = float(m["noise"])
    except ValueError:
        noise = None
    return {"data": m["data"], "patch_size": int(m["patch"]), "channels": int(m["channels"]),
            "num_blocks": int(m["blocks"]), "layers_per_block": int(m["layers"]), "noise_std": noise}


def _isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


def infer_geometry(D: int, T: int) -> dict:
    """(channels, patch, image side) from token size D = C p^2 and T = (img / p)^2 alone.

    D cannot be both a square and three times a square (sqrt(3) is irrational), so at most one
    of C = 1, C = 3 fits."""
    side = _isqrt_exact(T)
    for C in (1, 3):
        p = _isqrt_exact(D // C) if D % C == 0 else None
        if p and side:
            return {"in_channels": C, "patch_size": p, "img_size": p * side}
    raise UserError(f"cannot infer the image geometry from token size {D} and T={T} (needs a square "
                    "number of patches of 1 or 3 channels): give img_size and patch_size",
                    setting="img_size,patch_size")


def infer_config(state: dict, geometry: dict, path) -> TarFlowConfig:
    """Architecture from tensor shapes; image geometry and head size from `geometry`."""
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
    patch = int(geometry["patch_size"])
    if patch < 1 or D % (patch * patch) or D // (patch * patch) not in (1, 3):
        raise UserError(f"patch_size {patch} does not fit token size {D} of {path} "
                        "(token size = channels x patch area, channels 1 or 3)", setting="patch_size")
    in_ch = D // (patch * patch)
    if "in_channels" in geometry and int(geometry["in_channels"]) != in_ch:
        raise UserError(f"in_channels={geometry['in_channels']} with patch_size {patch} does not give "
                        f"token size {D} of {path} ({in_ch} channels do)", setting="in_channels")
    head_dim = int(geometry.get("head_dim", DEFAULT_HEAD_DIM))
    if head_dim < 1 or C % head_dim:
        raise UserError(f"head size {head_dim} does not divide the width {C} of {path}: give head_dim",
                        setting="head_dim")
    cfg = TarFlowConfig(
        img_size=int(geometry["img_size"]), in_channels=in_ch, patch_size=patch,
        channels=C, num_blocks=max(blocks) + 1, layers_per_block=max(layers) + 1,
        head_dim=head_dim, expansion=hidden // C,
        num_classes=0 if ce is None else ce.shape[0], nvp=out == 2 * D)
    if cfg.num_patches != T:
        raise UserError(f"img_size {cfg.img_size} / patch_size {patch} gives {cfg.num_patches} "
                        f"tokens but {path} has T={T}")
    return cfg


def _check_name(name: dict, cfg: TarFlowConfig, path) -> None:
    """An official file name must agree with the weights it names."""
    for field in ("patch_size", "channels", "num_blocks", "layers_per_block"):
        if name[field] != getattr(cfg, field):
            raise UserError(f"file name {Path(path).name} says {field}={name[field]} but the weights "
                            f"have {getattr(cfg, field)}")


def _read_sidecar(path: Path) -> dict:
    sp = sidecar_path(path)
    if not sp.is_file():
        return {}
    try:
        side = json.loads(sp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sidecar {sp} is not valid JSON: {e}") from None
    if not isinstance(side, dict):
        raise UserError(f"sidecar {sp} must hold a JSON object")
    return side


def build_model(state: dict, *, source, name: dict | None = None, sidecar: dict | None = None,
                **options) -> TarFlow:
    """A TarFlow from an official-layout state_dict. Geometry precedence: explicit options >
    sidecar > official file name > inference from the tensor shapes."""
    sidecar = sidecar or {}
    given = {k: v for k, v in options.items() if v is not None}
    for key in ("blocks.0.proj_in.weight", "blocks.0.pos_embed"):
        if key not in state:
            raise UserError(f"checkpoint {source} does not match TarFlow: missing key '{key}'")
    D, T = state["blocks.0.proj_in.weight"].shape[1], state["blocks.0.pos_embed"].shape[0]
    geometry, origin = {}, "inferred"
    if name is not None:
        p, side = name["patch_size"], _isqrt_exact(T)
        if D % (p * p) or D // (p * p) not in (1, 3):
            raise UserError(f"file name {Path(str(source)).name} says patch_size={p}, which does not "
                            f"fit the token size {D} of the weights")
        geometry, origin = {"patch_size": p} | ({"img_size": p * side} if side else {}), "name"
    elif not {"img_size", "patch_size"} <= set(given) | set(sidecar):
        geometry = infer_geometry(D, T)
    for src, label in ((sidecar, "sidecar"), (given, "options")):
        picked = {k: src[k] for k in SIDECAR_KEYS if k in src}
        if {"img_size", "patch_size"} & set(picked):
            origin = label
        geometry |= picked
    missing = [k for k in ("img_size", "patch_size") if k not in geometry]
    if missing:
        words = {"img_size": "image size", "patch_size": "patch size"}
        raise UserError(f"{source} does not say its {' and '.join(words[k] for k in missing)}: give "
                        + " and ".join(missing), setting=",".join(missing))
    cfg = infer_config(state, geometry, source)
    if name is not None:
        _check_name(name, cfg, source)
    model = TarFlow(cfg)
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in state:
            raise UserError(f"checkpoint {source} does not match TarFlow: missing key '{k}'")
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"checkpoint {source}: key '{k}' has shape {tuple(state[k].shape)}, "
                            f"expected {tuple(v.shape)}")
    for k in state:
        if k not in expected:
            raise UserError(f"checkpoint {source} does not match TarFlow: unexpected key '{k}'")
    model.load_state_dict(state)
    noise = sidecar.get("train", {}).get("noise_std") if isinstance(sidecar.get("train"), dict) else None
    if noise is None and name is not None:
        noise = name["noise_std"]
    model.meta = sidecar | {"noise_std": noise, "geometry_source": origin}
    return model.eval()


def load_checkpoint(path, *, img_size: int | None = None, patch_size: int | None = None,
                    in_channels: int | None = None, head_dim: int | None = None,
                    device="cpu", dtype=torch.float32) -> TarFlow:
    """Load a TarFlow `.pth` (official layout). No sidecar or option is needed: the geometry is
    read from the sidecar, the official file name, or the tensor shapes (see `build_model`)."""
    path = Path(path)
    state = _read_state_dict(path)
    model = build_model(state, source=path, name=parse_official_name(path), sidecar=_read_sidecar(path),
                        img_size=img_size, patch_size=patch_size, in_channels=in_channels,
                        head_dim=head_dim)
    return model.to(device=device, dtype=dtype)


def as_tarflow(obj, *, img_size: int | None = None, patch_size: int | None = None,
               in_channels: int | None = None, head_dim: int | None = None) -> TarFlow:
    """A model already in memory as a `TarFlow`: the object itself if it is one, else a TarFlow
    built from its official-layout state_dict (any nn.Module holding the official keys, such as
    the official code's `Model`, or the state_dict itself), on the module's device and dtype."""
    if isinstance(obj, TarFlow):
        return obj
    if isinstance(obj, torch.nn.Module):
        ref = next(iter(obj.parameters()), None)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in obj.state_dict().items()}
        model = build_model(state, source=type(obj).__name__, img_size=img_size, patch_size=patch_size,
                            in_channels=in_channels, head_dim=head_dim)
        return model if ref is None else model.to(device=ref.device, dtype=ref.dtype)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = {k: v.detach().to("cpu", torch.float32) for k, v in obj.items()}
        return build_model(state, source="state_dict", img_size=img_size, patch_size=patch_size,
                           in_channels=in_channels, head_dim=head_dim)
    raise UserError(f"expected a TarFlow, an nn.Module or a state_dict, got {type(obj).__name__}")
