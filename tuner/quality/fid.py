"""Fréchet distance, reference statistics and FID of samples (clean-fid's maths on arrays).

Reference statistics are an `.npz` with `mu` (float64), `sigma_triu` (upper triangle of the
covariance, float32, to keep committed files small) and `meta` (JSON: extractor id, n, split,
sha256 of the split's uint8 pixels, source file name, image shape).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tarflow.checkpoint import atomic_write_bytes
from tarflow.data import load_images
from tarflow.errors import UserError

from tuner.quality.extractors import FID_DIR, Extractor, get_extractor


def default_ref_path(extractor_name: str) -> Path:
    """Committed reference statistics of the bundled MNIST default for one extractor."""
    return FID_DIR / f"ref_{extractor_name}_test.npz"


# --- Fréchet distance -----------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The matrix square root is scipy's; a singular product is retried with 1e-6 added to both
    diagonals, and the negligible imaginary part sqrtm returns is dropped (as clean-fid does;
    tests/test_quality.py checks the two agree)."""
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise UserError(f"feature statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    root = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        eye = np.eye(len(s1)) * 1e-6
        root = linalg.sqrtm((s1 + eye) @ (s2 + eye))
    root = np.real(root)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


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


def _load_split(data_path: Path, split: str, size: int | None = None) -> np.ndarray:
    if Path(data_path).is_dir():
        return load_images(data_path, size=size)[0]
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
                    size: int | None = None, cache_path=None, batch_size: int = 100,
                    progress: bool = False) -> RefStats:
    """Reference statistics of a dataset split, computed once and cached in `cache_path`.

    npz: `split` picks x_train / x_test (or names an array); folder: `split` is only recorded,
    images are centre-cropped and, with `size`, resized to size×size (the model's resolution).
    n < size of the split takes a random subset (seed 0). A cache whose metadata (extractor,
    n, split, pixel hash) differs from the request is refused, never silently recomputed.
    """
    ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
    data_path = Path(data_path)
    u8 = _load_split(data_path, split, size)
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
