"""Image loading: an `.npz` of uint8 arrays or a folder of image files -> model space [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
NPZ_IMAGE_KEYS = ("x_train", "x", "images", "x_test")
NPZ_LABEL_KEYS = {"x_train": "y_train", "x_test": "y_test", "x": "y", "images": "labels"}


def to_nchw(arr: np.ndarray, source) -> np.ndarray:
    """Accept N×H×W, N×H×W×c or N×c×H×W (c in 1, 3) uint8; return N×c×H×W."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[2] != arr.shape[3]:
        raise UserError(f"{source}: expected square images shaped N×H×W, N×H×W×C or N×C×H×W "
                        f"with C in (1, 3), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def load_images(path, key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (uint8 N×c×H×W, labels or None) from an npz (first known key) or an image folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_dir():
        return _load_folder(path), None
    try:
        data = np.load(path)
        keys = list(data.keys())
    except Exception as e:
        raise UserError(f"cannot read {path} as .npz: {e}") from None
    key = key or next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
    if key is None or key not in keys:
        raise UserError(f"{path} has no image array (looked for {', '.join(NPZ_IMAGE_KEYS)}; "
                        f"found {', '.join(keys) or 'nothing'})")
    arr = data[key]
    if arr.dtype != np.uint8:
        raise UserError(f"{path}:{key} must be uint8 pixels, got {arr.dtype}")
    label_key = NPZ_LABEL_KEYS.get(key)
    labels = data[label_key].astype(np.int64) if label_key in keys else None
    if labels is not None and len(labels) != len(arr):
        raise UserError(f"{path}: {len(arr)} images but {len(labels)} labels")
    return to_nchw(arr, f"{path}:{key}"), labels


def _load_folder(path: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
    imgs = []
    for f in files:
        try:
            im = Image.open(f)
            imgs.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I") else "RGB")))
        except Exception as e:
            raise UserError(f"cannot read image {f}: {e}") from None
    if len({a.shape for a in imgs}) != 1:
        raise UserError(f"images in {path} differ in size")
    return to_nchw(np.stack(imgs), path)


def to_model_space(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space (any float, unclipped) -> uint8 N×c×H×W."""
    return ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def save_grid(x: torch.Tensor, path, nrow: int | None = None, scale: int = 2) -> None:
    """Save model-space images as one PNG grid (1-pixel gaps)."""
    from PIL import Image

    from .checkpoint import atomic_write_bytes

    u8 = to_uint8(x)
    n, c, h, w = u8.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = u8[i]
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write_bytes(path, lambda f: img.save(f, format="PNG"))
