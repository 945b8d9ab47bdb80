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


def load_images(path, key: str | None = None, size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (uint8 N×c×H×W, labels or None) from an npz (first known key) or an image folder.

    A folder's images are centre-cropped to squares and, when `size` is given or their sizes
    differ, resized to size×size (bicubic, as clean-fid's folder mode); with sub-folders, every
    image lies in one and its label is the sub-folder's index in sorted name order."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_dir():
        return _load_folder(path, size)
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
        raise UserError(f"{path}:{key} must be uint8 pixels (0-255), got {arr.dtype}")
    label_key = NPZ_LABEL_KEYS.get(key)
    labels = data[label_key] if label_key in keys else None
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(arr) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: {label_key} must be {len(arr)} integer labels, got "
                            f"{labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return to_nchw(arr, f"{path}:{key}"), labels


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(path: Path, size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    classes = sorted(p for p in path.iterdir() if p.is_dir() and _image_files(p))
    loose = _image_files(path)
    if classes and loose:
        raise UserError(f"{path} holds both images and class sub-folders: put every image in a "
                        "class sub-folder, or none")
    files = [(f, i) for i, c in enumerate(classes) for f in _image_files(c)] or [(f, -1) for f in loose]
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
    imgs = [_read_image(f) for f, _ in files]
    grey = all(im.mode == "L" for im in imgs)
    imgs = [im.convert("L" if grey else "RGB") for im in imgs]
    if size is None and len({im.size for im in imgs}) > 1:
        size = min(min(im.size) for im in imgs)
    arrs = [np.asarray(_square(im, size)) for im in imgs]
    labels = np.array([i for _, i in files], np.int64) if classes else None
    return to_nchw(np.stack(arrs), path), labels


def _read_image(f: Path):
    from PIL import Image

    try:
        with Image.open(f) as im:
            im.load()
            return im.convert("L") if im.mode in ("L", "1", "I", "I;16") else im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {f}: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from None


def _square(im, size: int | None):
    """Centre crop to a square, then (if asked) bicubic resize to size×size."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im if size is None or size == s else im.resize((size, size), Image.BICUBIC)


def to_model_space(u8: np.ndarray) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 model space [-1, 1] (u / 127.5 - 1); `to_pixels` inverts it."""
    return torch.from_numpy(u8).float() / 127.5 - 1


UINT8_NAN = 0  # what to_uint8 writes for a NaN value: black, so a failed sample shows as a hole


def to_pixels(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Model space -> pixel values on 0..255 as floats, unquantised, on the CPU: the one
    conversion behind `to_uint8` and the pixel metrics (drift, RMSE), so they cannot disagree.

    x is clipped to [-1, 1] first (a flow sample may overshoot), then mapped by (x + 1) * 127.5,
    computed in `dtype` (float32 by default; float64 for metrics that want it).
    Non-finite values: +inf and -inf clip to 255 and 0 like any other out-of-range value; NaN is
    NOT converted and stays NaN, because no pixel value is right for it: each caller applies its
    one stated policy (a drift metric may count it as maximal, `to_uint8` writes UINT8_NAN)."""
    return (x.detach().cpu().to(dtype).clamp(-1, 1) + 1) * 127.5


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space (any float, unclipped) -> uint8 N×c×H×W: `to_pixels` rounded half to even.

    NaN becomes UINT8_NAN (0) explicitly; casting NaN to an integer type is undefined."""
    px = to_pixels(x).round().nan_to_num(nan=float(UINT8_NAN))
    return px.to(torch.uint8).numpy()


def grid_png(u8: np.ndarray, nrow: int | None = None, scale: int = 2, gap: int = 255) -> bytes:
    """uint8 N×c×H×W -> PNG bytes of one grid (1-pixel gaps), nearest-neighbour upscaled;
    `nrow` images per row (default: a square grid)."""
    import io

    from PIL import Image

    n, c, h, w = u8.shape
    nrow = max(1, min(nrow or int(np.ceil(np.sqrt(n))), n))
    rows = -(-n // nrow)
    grid = np.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), gap, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = u8[i]
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_grid(x: torch.Tensor, path, nrow: int | None = None, scale: int = 2) -> None:
    """Save model-space images as one PNG grid."""
    from .io import atomic_write_bytes

    png = grid_png(to_uint8(x), nrow, scale)
    atomic_write_bytes(path, lambda f: f.write(png))
