"""What a tune spends sampling, counted as the sampler counts it.

A tune is expensive and its cost is easy to miss: on a T = 1024, 8-block model one sequential
batch is 8,184 serial transformer passes, and a search runs hundreds of batch-equivalents before
its baselines, noise floor and verification. So every sampler run of a tune is accounted: each
trial records what it spent (also a trial pruned half-way: the passes were paid), and the study
summary records the totals per stage.

Units, for every stage alike:

* `passes`: serial transformer passes (`SamplerStats.passes`), summed over the batches sampled:
  what a latency-bound device (a GPU at small batch) pays for.
* `tokens`: query tokens pushed through the transformer (`sum(SamplerStats.tokens)`), per
  sequence of a batch (all samples of a batch go through the same tokens), summed over batches:
  what a throughput-bound device (a CPU) pays for. The same unit as `bench`'s tokens column.
* `sequential_batches`: passes / (B (T - 1)), the passes of the exact sequential sampler on one
  batch: "the stage cost as much as N sequential batches" on a latency-bound device.
* `seconds`: wall time of the stage on the machine that ran it, sampling and FID features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import optuna

STAGES = ("search", "model_seed", "baseline", "noise_floor", "verification", "retiming")
STAGE_TITLES = {"search": "search (all trials)", "model_seed": "model seed (drift calibration)",
                "baseline": "sequential baseline", "noise_floor": "noise floor",
                "verification": "verification (fresh noise)", "retiming": "re-timing"}
TRIAL_ATTR = "cost"  # the Optuna user attribute every trial's spending is stored under


@dataclass
class Spent:
    """Sampling work of one stage (or one trial); see the module docstring for the units."""

    passes: int = 0
    tokens: int = 0
    batches: int = 0  # sampler calls that spent it (one batch each)
    seconds: float = 0.0
    sequential_batches: float | None = None  # passes / (B (T - 1)); set by `priced`

    def add(self, stats) -> None:
        """Count one sampled batch (its `SamplerStats`)."""
        self.passes += int(stats.passes)
        self.tokens += int(sum(stats.tokens))
        self.batches += 1

    def add_spent(self, other: "Spent") -> None:
        self.passes += other.passes
        self.tokens += other.tokens
        self.batches += other.batches
        self.seconds += other.seconds

    def priced(self, B: int, T: int) -> "Spent":
        """A copy with `sequential_batches` for a model of B blocks and T tokens, seconds rounded."""
        return Spent(self.passes, self.tokens, self.batches, round(self.seconds, 2),
                     round(self.passes / (B * max(T - 1, 1)), 3))

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, d: dict | None) -> "Spent":
        d = d or {}
        return cls(int(d.get("passes", 0)), int(d.get("tokens", 0)), int(d.get("batches", 0)),
                   float(d.get("seconds", 0.0)), d.get("sequential_batches"))


@dataclass
class TuneCost:
    """summary.json's `cost`: what the tune spent per stage (STAGES), and what it announced.

    `search` sums the trials' own records (every worker's, pruned trials included); the other
    stages are the exporting worker's (every worker of a shared study pays its own baseline and
    noise floor). `estimate` is the forecast the tune printed before its first trial (per stage,
    the same units), so the report can show the two side by side."""

    stages: dict[str, Spent]
    trials: int = 0  # trials whose spending is in `search`
    unrecorded: int = 0  # finished trials with no record (run before costs were recorded): not in `search`
    stopped_early: int = 0  # trials pruned part-way (warm-up screen or drift limit already broken)
    stopped_early_passes: int = 0  # what those spent
    estimate: dict[str, Spent] | None = None

    @property
    def total(self) -> Spent:
        out, seq = Spent(), 0.0
        for s in self.stages.values():
            out.add_spent(s)
            seq = None if seq is None or s.sequential_batches is None else seq + s.sequential_batches
        out.sequential_batches = None if seq is None else round(seq, 3)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TuneCost":
        est = d.get("estimate")
        order = sorted(d["stages"], key=lambda k: (STAGES.index(k) if k in STAGES else len(STAGES), k))
        return cls(stages={k: Spent.from_record(d["stages"][k]) for k in order},
                   trials=int(d.get("trials", 0)), unrecorded=int(d.get("unrecorded", 0)),
                   stopped_early=int(d.get("stopped_early", 0)),
                   stopped_early_passes=int(d.get("stopped_early_passes", 0)),
                   estimate=None if est is None else {k: Spent.from_record(v) for k, v in est.items()})


def search_spent(study: optuna.Study) -> tuple[Spent, int, int, int, int]:
    """The trials' own records summed: (spent, trials recorded, finished trials without a
    record, trials stopped part-way, their passes). Running trials (another worker's) are left out."""
    total, recorded, missing, early, early_passes = Spent(), 0, 0, 0, 0
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get(TRIAL_ATTR)
        if rec is None:
            missing += t.state.is_finished() and not t.user_attrs.get("over_cap")
            continue
        spent = Spent.from_record(rec)
        total.add_spent(spent)
        recorded += 1
        if t.state == optuna.trial.TrialState.PRUNED:
            early, early_passes = early + 1, early_passes + spent.passes
    return total, recorded, int(missing), early, early_passes


def tune_cost(study, B: int, T: int, stages: dict[str, Spent], estimate: dict[str, Spent] | None) -> TuneCost:
    """The study's cost record: `stages` holds every stage but the search, which is summed from
    the trials' records here."""
    search, recorded, missing, early, early_passes = search_spent(study)
    spent = {"search": search} | stages
    return TuneCost(stages={k: spent.get(k, Spent()).priced(B, T) for k in STAGES}, trials=recorded,
                    unrecorded=missing, stopped_early=early, stopped_early_passes=early_passes,
                    estimate=None if estimate is None else {k: v.priced(B, T) for k, v in estimate.items()})


def floor_spent(floor: dict | None) -> Spent:
    """The noise floor's sampling as `tuner.quality.floor.noise_floor` recorded it."""
    floor = floor or {}
    return Spent(int(floor.get("passes", 0)), int(floor.get("tokens", 0)), int(floor.get("batches", 0)),
                 float(floor.get("sampling_seconds", 0.0)))


def with_cost_columns(table, study):
    """trials.csv with each trial's spending (`cost_passes`, `cost_tokens`, `cost_seconds`): a
    pruned trial has no objective value but did cost something."""
    recs = {t.number: Spent.from_record(t.user_attrs[TRIAL_ATTR]) for t in study.get_trials(deepcopy=False)
            if TRIAL_ATTR in t.user_attrs}
    if table.empty:
        return table
    for col, get in (("cost_passes", lambda s: s.passes), ("cost_tokens", lambda s: s.tokens),
                     ("cost_seconds", lambda s: round(s.seconds, 2))):
        table[col] = [get(recs[n]) if n in recs else None for n in table["number"]]
    return table


def fmt_count(x: float) -> str:
    """12,345 / 1.23 M: counts as a person reads them."""
    return f"{x / 1e6:.3g} M" if x >= 1e6 else f"{x:,.0f}"
