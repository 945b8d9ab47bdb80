"""How samples are drawn, apart from the schedule: the one definition every command shares.

A schedule says how each block is *solved*; `SamplingSettings` says what is being sampled
(labels, classifier-free guidance, the denoising step, precision). A schedule is only tuned
for one set of these, so `tune` records them in `schedule.json` (`provenance.sampling`), and
`sample`, `bench` and `fid` reuse what a schedule recorded unless told otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from .errors import UserError

LABEL_POLICIES = ("balanced", "random", "uncond")  # or a comma list of class indices
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}  # half: weights and K/V only, iterates stay float32


@dataclass(frozen=True)
class SamplingSettings:
    """labels: balanced (i mod K), random (seeded), uncond, or a comma list such as "3,7".
    guidance: classifier-free guidance w on log-scale and shift, p_c + w (p_c - p_u); 0 = off.
    guidance_anneal: w grows linearly over token positions. attn_temp: attention temperature
    of the unconditional pass. denoise_std: the training noise std removed by one score step
    after sampling (0 = no denoising). dtype: the precision the model is loaded in; the
    sampler runs the model as it finds it.
    """

    labels: str = "balanced"
    guidance: float = 0.0
    guidance_anneal: bool = False
    attn_temp: float = 1.0
    denoise_std: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        if self.labels not in LABEL_POLICIES:
            _label_list(self.labels)
        for name, lo in (("guidance", 0.0), ("denoise_std", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise UserError(f"sampling setting {name} must be a finite number >= {lo:g}, got {v!r}",
                                setting=name)
        t = self.attn_temp
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise UserError(f"sampling setting attn_temp must be a finite number > 0, got {t!r}",
                            setting="attn_temp")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", setting="dtype")
        object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "attn_temp", float(self.attn_temp))
        object.__setattr__(self, "denoise_std", float(self.denoise_std))

    @property
    def guided(self) -> bool:
        return self.guidance > 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, source: str = "sampling settings") -> "SamplingSettings":
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected an object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**d)

    def differences(self, other: "SamplingSettings") -> list[str]:
        """Names of the settings that differ (for warnings and refusals)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def with_(self, **changes) -> "SamplingSettings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check_model(self, model) -> None:
        """Refuse settings the model cannot honour (guidance or class labels on an unconditional model)."""
        K = model.cfg.num_classes
        if not K and self.guided:
            raise UserError("guidance needs a class-conditional model (this one has no class_embed)",
                            setting="guidance")
        if self.labels not in LABEL_POLICIES:
            bad = [v for v in _label_list(self.labels) if v >= K or (not K and v != -1)]
            if bad:
                raise UserError(f"labels {self.labels!r}: class {bad[0]} is outside 0..{K - 1}"
                                if K else "this model is unconditional: labels (class indices) are not accepted",
                                setting="labels")

    def make_labels(self, n: int, model, seed: int = 0) -> torch.Tensor | None:
        """Class labels for n samples under this policy; None for an unconditional model.

        -1 means unconditional (the mean class embedding), as the official checkpoints expect."""
        self.check_model(model)
        K = model.cfg.num_classes
        if not K:
            return None
        if self.labels == "balanced":
            return torch.arange(n) % K
        if self.labels == "random":
            return torch.randint(K, (n,), generator=torch.Generator().manual_seed(seed + 7919))
        if self.labels == "uncond":
            return torch.full((n,), -1, dtype=torch.long)
        vals = _label_list(self.labels)
        return torch.tensor(vals * (n // len(vals) + 1))[:n]


def _label_list(spec: str) -> list[int]:
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < -1 for v in vals):
        raise UserError(f"labels must be balanced, random, uncond or a comma list of class "
                        f"indices (-1 = unconditional), got {spec!r}", setting="labels")
    return vals


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling options as given on a command line (None = not given).

    Precedence: what is given > what the schedule recorded (`provenance.sampling`) > defaults.
    `denoise` without `noise_std` uses the training noise std the checkpoint states (sidecar or
    official file name)."""

    labels: str | None = None
    guidance: float | None = None
    guidance_anneal: bool | None = None
    attn_temp: float | None = None
    denoise: bool | None = None
    noise_std: float | None = None
    dtype: str | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def dtype_for(self, recorded: SamplingSettings | None) -> torch.dtype:
        """Precision to load the model in (needed before the model exists)."""
        name = self.dtype or (recorded.dtype if recorded else "float32")
        if name not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}", setting="dtype")
        return DTYPES[name]

    def resolve(self, *, recorded: SamplingSettings | None = None,
                training_noise_std: float | None = None) -> SamplingSettings:
        base = recorded or SamplingSettings()
        if self.noise_std is not None and not (self.denoise or (self.denoise is None and base.denoise_std > 0)):
            raise UserError("noise_std sets the denoising step's noise level: add denoise=True",
                            setting="noise_std,denoise")
        if self.denoise is False:
            denoise_std = 0.0
        elif self.denoise:
            denoise_std = self.noise_std if self.noise_std is not None else training_noise_std
            if denoise_std is None:
                raise UserError("denoise needs noise_std: the checkpoint does not state its training noise "
                                "(no sidecar, and no number in an official file name)", setting="denoise,noise_std")
        else:
            denoise_std = self.noise_std if self.noise_std is not None else base.denoise_std
        return base.with_(labels=self.labels, guidance=self.guidance, guidance_anneal=self.guidance_anneal,
                          attn_temp=self.attn_temp, dtype=self.dtype, denoise_std=denoise_std)
