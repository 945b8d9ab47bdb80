"""The study summary: what `tune` writes to summary.json and the report reads, as typed data.

One definition, versioned: the search fills it, `save` writes sorted JSON, `load` refuses an
unknown version or a missing field with one line. Search-time latencies (each trial timed while
the search ran) and re-timed latencies (the chosen schedule and the seeds timed again,
interleaved, after the search) are separate fields, never mixed.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from tarflow.checkpoint import atomic_write_text, read_json
from tarflow.errors import UserError
from tarflow.settings import SamplingSettings

SUMMARY_VERSION = 1


@dataclass
class SeedResult:
    """A seed schedule as the search ran it (search-time figures) and, if re-timed, its final latency."""

    trial: int
    latency_s: float | None  # search-time median
    fid: float
    fid_gap: float
    feasible: bool
    proxy: dict
    passes: int
    iters: list
    schedule: list  # its block plans, sampling order
    latency_final: dict | None = None  # re-timed after the search (timing stats)


@dataclass
class Sequential:
    """The exact sampler on the search noise: the FID and latency every trial is compared with."""

    latency: dict
    fid: float
    extractor: str
    n: int


@dataclass
class StudySummary:
    study: str
    checkpoint: str | None
    model: dict  # fingerprint: arch + weights sha256
    device: dict  # device_class, device_name, torch
    batch: int
    tolerance: float
    config: dict  # the TuneConfig fields other than sampling
    sampling: SamplingSettings
    trials: int
    feasible: int
    search_seconds: float
    sequential: Sequential
    noise_floor: dict
    tolerance_warning: str | None
    seeds: dict[str, SeedResult]
    schedule: dict | None = None  # the exported schedule file's content, None when none met the tolerance
    chosen_trial: int | None = None
    chosen_iters: list | None = None
    final_latency: dict[str, dict] = field(default_factory=dict)  # re-timed: name -> timing stats
    version: int = SUMMARY_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampling"] = self.sampling.to_dict()
        return d

    def save(self, path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, sort_keys=True, default=str) + "\n")

    @classmethod
    def from_dict(cls, d, source: str = "summary") -> "StudySummary":
        if not isinstance(d, dict):
            raise UserError(f"{source}: not a study summary (expected a JSON object)")
        if d.get("version") != SUMMARY_VERSION:
            raise UserError(f"{source}: unknown summary version {d.get('version')!r} "
                            f"(this tool reads {SUMMARY_VERSION})")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: not a valid study summary (missing {', '.join(missing)})")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{source}: unknown summary field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**(d | {
                "sampling": SamplingSettings.from_dict(d["sampling"], f"{source}: sampling"),
                "sequential": Sequential(**d["sequential"]),
                "seeds": {k: SeedResult(**v) for k, v in d["seeds"].items()}}))
        except TypeError as e:
            raise UserError(f"{source}: not a valid study summary ({e})") from None

    @classmethod
    def load(cls, path) -> "StudySummary":
        return cls.from_dict(read_json(path, "a valid study summary"), str(path))

    @property
    def sequential_passes(self) -> int:
        """Serial passes of the sequential sampler per batch: T - 1 one-token steps per block."""
        a = self.model["arch"]
        return a["num_blocks"] * ((a["img_size"] // a["patch_size"]) ** 2 - 1)

    @property
    def sequential_latency_s(self) -> float:
        """Search-time median latency of the sequential sampler."""
        return self.sequential.latency["median_s"]
