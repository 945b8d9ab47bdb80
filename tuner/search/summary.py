"""The study summary: what `tune` writes to summary.json and the report reads, as typed data.

One definition, versioned: the search fills it, `save` writes sorted JSON, `load` refuses an
unknown version or a missing field with one line. Search-time latencies (each trial timed while
the search ran) and re-timed latencies (the chosen schedule and the seeds timed again,
interleaved, after the search) are separate fields, never mixed.

Version 2 keeps what the search minimised apart from what was timed: `objective` is the
objective's record (tuner.search.objectives: kind, spec, the unit of stored values, how they are
shown), every `objective_value` is in that unit (seconds, serial passes or modelled seconds per
batch), and a field named `latency_s` only ever holds a measured time in seconds. Version 1
stored each trial's objective value as `latency_s` whatever the objective was, which made the
report print pass counts as milliseconds. A version-1 summary is migrated when it is loaded
(`upgrade_v1`), so old study folders and the results stored in old studies' databases (read by
`tune --resume`) still work; what version 1 never recorded (the measured search-time latency of
a passes or cost study's trials) is then None unless the caller passes it from trials.csv.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from tarflow.checkpoint import atomic_write_text, read_json
from tarflow.errors import UserError
from tarflow.settings import SamplingSettings

from tuner.search.accounting import TuneCost
from tuner.search.objectives import Objective, from_record, objective_of

SUMMARY_VERSION = 2


@dataclass
class SeedResult:
    """A seed schedule as the search ran it (search-time figures) and, if re-timed, its final latency."""

    trial: int
    objective_value: float | None  # the trial's value, in the study objective's unit
    latency_s: float | None  # measured search-time median seconds per batch (None: not recorded)
    fid: float
    fid_gap: float
    feasible: bool
    proxy: dict
    passes: int  # serial passes summed over all the search's batches
    iters: list
    schedule: list  # its block plans, sampling order
    latency_final: dict | None = None  # re-timed after the search (timing stats)


@dataclass
class Sequential:
    """The exact sampler on the search noise: the FID, latency and objective value every trial is
    compared with."""

    latency: dict  # measured timing stats (seconds)
    fid: float
    extractor: str
    n: int
    objective_value: float | None = None  # in the study objective's unit


@dataclass
class StudySummary:
    study: str
    checkpoint: str | None
    model: dict  # fingerprint: arch + weights sha256
    device: dict  # device_class, device_name, torch
    batch: int
    tolerance: float
    config: dict  # the TuneConfig fields other than sampling
    objective: dict  # what the search minimised: the objective's describe() record
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
    chosen_value: float | None = None  # the chosen trial's objective value (objective's unit)
    chosen_latency_s: float | None = None  # its measured search-time median seconds per batch
    final_latency: dict[str, dict] = field(default_factory=dict)  # re-timed: name -> timing stats
    # what the tune itself spent sampling, per stage, and what it announced (tuner.search.accounting);
    # None in summaries written before it was recorded (they load unchanged: same version)
    cost: TuneCost | None = None
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
        if d.get("version") == 1:
            d = upgrade_v1(d, source=source)
        if d.get("version") != SUMMARY_VERSION:
            raise UserError(f"{source}: unknown summary version {d.get('version')!r} "
                            f"(this tool reads 1 and {SUMMARY_VERSION})")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"{source}: not a valid study summary (missing {', '.join(missing)})")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{source}: unknown summary field(s) {', '.join(sorted(unknown))}")
        try:
            from_record(d["objective"])
        except UserError as e:
            raise UserError(f"{source}: not a valid study summary (objective: {e})") from None
        try:
            return cls(**(d | {
                "sampling": SamplingSettings.from_dict(d["sampling"], f"{source}: sampling"),
                "sequential": Sequential(**d["sequential"]),
                "seeds": {k: SeedResult(**v) for k, v in d["seeds"].items()},
                "cost": None if d.get("cost") is None else TuneCost.from_dict(d["cost"])}))
        except (TypeError, AttributeError, KeyError, ValueError) as e:
            raise UserError(f"{source}: not a valid study summary ({e})") from None

    @classmethod
    def load(cls, path) -> "StudySummary":
        return cls.from_dict(read_json(path, "a valid study summary"), str(path))

    @property
    def goal(self) -> Objective:
        """What the search minimised, as an object (units, labels, formatting)."""
        return from_record(self.objective)

    @property
    def sequential_value(self) -> float | None:
        """The sequential sampler's objective value: as its seed trial measured it, else the
        baseline's (the seed may not have completed)."""
        seed = self.seeds.get("sequential")
        if seed is not None and seed.objective_value is not None:
            return seed.objective_value
        return self.sequential.objective_value

    @property
    def sequential_passes(self) -> int:
        """Serial passes of the sequential sampler per batch: T - 1 one-token steps per block."""
        a = self.model["arch"]
        return a["num_blocks"] * ((a["img_size"] // a["patch_size"]) ** 2 - 1)

    @property
    def sequential_latency_s(self) -> float:
        """Search-time median latency of the sequential sampler."""
        return self.sequential.latency["median_s"]


def upgrade_v1(d: dict, measured: dict[int, float] | None = None, source: str = "summary") -> dict:
    """A version-1 summary as version 2. Version 1 wrote every trial value as `latency_s` (and
    the chosen one as the schedule's `provenance.latency_search_s`), so for a passes or cost
    study those held pass counts or modelled seconds. They become `objective_value`; a
    `latency_s` is kept only where it was a measured time: from `measured` (trial number ->
    measured median seconds, e.g. trials.csv's `latency_s` column) or, for a latency study, the
    value itself. Returns a new dict; the embedded schedule file's content is left as written."""
    try:
        d = json.loads(json.dumps(d))
        prov = (d.get("schedule") or {}).get("provenance") or {}
        goal = objective_of(d.get("config") or {}, prov.get("objective_device"))
        measured = measured or {}

        def timed(trial, value):
            return measured.get(trial, value if goal.measured else None)

        for rec in d["seeds"].values():
            rec["objective_value"] = rec.pop("latency_s")
            rec["latency_s"] = timed(rec["trial"], rec["objective_value"])
        chosen, seq_seed = d.get("chosen_trial"), d["seeds"].get("sequential")
        value = prov.get("objective_value", prov.get("latency_search_s")) if chosen is not None else None
        d["chosen_value"], d["chosen_latency_s"] = value, None if chosen is None else timed(chosen, value)
        d["sequential"]["objective_value"] = (seq_seed["objective_value"] if seq_seed else
                                              d["sequential"]["latency"]["median_s"] if goal.measured else None)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{source}: not a valid study summary of version 1 ({e})") from None
    return d | {"objective": goal.describe((d.get("device") or {}).get("device_name")), "version": 2}
