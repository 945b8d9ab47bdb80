"""What the search minimises, as objects: each objective knows how it reads its value off a
sampler run, the unit that value is in, how to show it, and which device it speaks for.

Before this module the objective was a string that five modules dispatched on, and a pass
count was printed as milliseconds. Everything that shows or stores an objective value (the
search, the summary, the verdict lines, the report's tables, cards and axes) asks the objective
instead; nothing outside this module looks at the objective's name.

A stored value (an Optuna trial value, trials.csv's `objective` column, the summary's
`objective_value` fields, the schedule's `provenance.objective_value`) is in the objective's
`unit`: seconds per batch for latency and modelled cost, serial passes per batch for passes.
`display` converts to the shown unit (`short_unit`: ms, passes). `describe()` is the record the
summary keeps, and `from_record` rebuilds the objective from it without any file at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tarflow.errors import UserError

NAMES = ("latency", "passes")  # plus cost:DEVICE.json
COST_PREFIX = "cost:"


@dataclass(frozen=True)
class RunCounts:
    """What one sampled batch (or several) cost, as the objectives read it."""

    batches: int  # batches sampled
    passes: int  # serial transformer passes, summed over the batches
    median_s: float | None  # measured median seconds per batch (None if not timed)
    modelled_s: float | None = None  # device-profile seconds per batch (cost objective only)


@dataclass(frozen=True)
class Objective:
    """Base: the sampling latency measured on this device (`latency`)."""

    kind: ClassVar[str] = "latency"
    spec: str = "latency"  # as given to tune: latency, passes or cost:FILE
    unit: str = "s per batch"  # of every stored value
    label: str = "latency"  # short noun for column headers, cards and axis titles
    short_unit: str = "ms"  # of the displayed number
    scale: float = 1e3  # displayed = stored x scale
    digits: int = 1
    measured: bool = True  # the value is a wall-clock time taken where the search ran
    gain: str = "speed-up vs sequential"  # what sequential's value / a schedule's value is called

    def value(self, run: RunCounts) -> float:
        """The stored trial value of a run (in `unit`)."""
        return run.median_s

    def display(self, value: float | None) -> float | None:
        return None if value is None else value * self.scale

    def number(self, value: float | None, none: str = "–") -> str:
        """The displayed number alone, as tables show it."""
        return none if _missing(value) else f"{self.display(value):.{self.digits}f}"

    def format(self, value: float | None, with_unit: bool = True) -> str:
        """`12.3 ms`, `36.9 passes`: the displayed number with its short unit."""
        if _missing(value):
            return "-"
        return f"{self.number(value)} {self.short_unit}" if with_unit else self.number(value)

    def title(self, batch: int | None = None) -> str:
        """Column header and axis title: what the number is, in which unit, per which batch."""
        per = "batch" if batch is None else f"batch of {batch}"
        return f"{self.label} ({self.short_unit} / {per})"

    def ratio(self, sequential: float | None, value: float | None) -> float | None:
        """How many times better than sequential (None when either is unknown or zero)."""
        if _missing(sequential) or _missing(value) or not value:
            return None
        return sequential / value

    def device_name(self, here: str) -> str | None:
        """The device the value speaks for (`here`: the name of the machine the search ran on)."""
        return here

    def headline(self, value: float, sequential: float | None, batch: int, blocks: int) -> str:
        """What tune's first closing line says the winner achieved in this objective."""
        r = self.ratio(sequential, value)
        vs = "" if r is None else f" = {r:.2f}x sequential"
        return f"{self.format(value)} per batch of {batch}{vs} (measured in the search)"

    def meaning(self, here: str) -> str | None:
        """What the objective's number means where the schedule was re-timed (`here`: that
        latency as a phrase); None when the objective is that latency."""
        return None

    def describe(self, here: str | None = None) -> dict:
        """The record summary.json keeps (and `from_record` reads): kind, spec, the unit of stored
        values, how they are shown, and the device they speak for (`here`: the search's machine)."""
        return {"kind": self.kind, "spec": self.spec, "unit": self.unit, "label": self.label,
                "shown_unit": self.short_unit, "shown_scale": self.scale, "measured": self.measured,
                "device": self.device_name(here)}


@dataclass(frozen=True)
class Passes(Objective):
    """Serial transformer passes per batch: what a latency-bound GPU pays; deterministic."""

    kind: ClassVar[str] = "passes"
    spec: str = "passes"
    unit: str = "serial passes per batch"
    label: str = "serial transformer passes"
    short_unit: str = "passes"
    scale: float = 1.0
    measured: bool = False
    gain: str = "fewer passes than sequential"

    def value(self, run: RunCounts) -> float:
        return run.passes / run.batches

    def number(self, value: float | None, none: str = "–") -> str:
        """Whole counts without a decimal (192), averages over batches with one (36.9)."""
        text = super().number(value, none)
        return text[:-2] if text.endswith(".0") else text

    def title(self, batch: int | None = None) -> str:
        return f"{self.label} per {'batch' if batch is None else f'batch of {batch}'}"

    def device_name(self, here: str) -> str | None:
        return None  # a count, true on any device

    def headline(self, value: float, sequential: float | None, batch: int, blocks: int) -> str:
        head = f"{self.number(value)} serial transformer passes per batch of {batch}"
        bound = f"the one-pass lower bound is {blocks}"
        r = self.ratio(sequential, value)
        if r is None:
            return f"{head} ({bound})"
        return f"{head} vs {self.number(sequential)} sequential ({r:.1f}x fewer; {bound})"

    def meaning(self, here: str) -> str | None:
        return ("where a pass costs about the same whatever it processes (a GPU at small batch) latency "
                f"falls about as passes do. It does not hold on this device: {here}, because it pays for "
                "all the tokens each pass processes. Re-time it where it runs: tarflow-tuner bench")


@dataclass(frozen=True)
class Cost(Objective):
    """Latency modelled from a device profile measured elsewhere (`cost:DEVICE.json`)."""

    kind: ClassVar[str] = "cost"
    device: str | None = None  # the profiled device's name (None: unknown to a reader)
    spec: str = "cost:"
    unit: str = "modelled s per batch"
    label: str = "modelled latency"
    measured: bool = False
    gain: str = "modelled speed-up vs sequential"
    profile: object = field(default=None, compare=False, repr=False)  # the loaded DeviceProfile

    def value(self, run: RunCounts) -> float:
        return run.modelled_s

    @property
    def profile_file(self) -> str:
        return Path(self.spec[len(COST_PREFIX):]).name

    def device_name(self, here: str) -> str | None:
        return self.device

    def headline(self, value: float, sequential: float | None, batch: int, blocks: int) -> str:
        r = self.ratio(sequential, value)
        vs = "" if r is None else f" = {r:.2f}x sequential"
        return (f"{self.format(value)} per batch of {batch} modelled on {self.device or '?'}{vs} "
                f"(device profile {self.profile_file})")

    def meaning(self, here: str) -> str | None:
        return (f"the search priced each pass with times measured on {self.device or '?'}; here it runs "
                f"{here}. Re-time it on the modelled device: tarflow-tuner bench")


def _cost(spec: str, device: str | None, profile=None) -> Cost:
    where = f"on {device}" if device else f"({Path(spec[len(COST_PREFIX):]).name})"
    return Cost(spec=spec, unit=f"modelled s per batch {where}", label=f"modelled latency {where}",
                device=device, profile=profile)


def default_objective(device: str) -> str:
    """Measured latency where latency is what the user will pay (a GPU); on a CPU, serial passes,
    because CPU latency pays for every token processed, not for the passes a GPU would."""
    return "latency" if str(device).startswith("cuda") else "passes"


def parse_objective(text: str) -> Objective:
    """`latency`, `passes` or `cost:DEVICE.json` as an objective; a bad name or an unreadable
    device profile is one line naming the setting."""
    if text == "latency":
        return Objective()
    if text == "passes":
        return Passes()
    if text.startswith(COST_PREFIX):
        from tuner.measure.device_profile import DeviceProfile

        prof = DeviceProfile.load(text[len(COST_PREFIX):])  # read once, here
        return _cost(text, prof.device["device_name"], prof)
    raise UserError(f"objective must be one of {', '.join(NAMES)} or cost:DEVICE.json, got {text!r}",
                    setting="objective")


def objective_of(config: dict, device: str | None = None) -> Objective:
    """The objective a stored study config names (no `objective`: latency, as before objectives
    were recorded), for readers of finished studies: a cost objective gets its units from
    `device` (what the study recorded) without reading the device-profile file."""
    text = str(config.get("objective") or "latency")
    if text.startswith(COST_PREFIX):
        return _cost(text, device)
    return parse_objective(text)


def from_record(record: dict) -> Objective:
    """The objective a `describe()` record names (summary.json's `objective`)."""
    if not isinstance(record, dict) or "spec" not in record:
        raise UserError(f"not an objective record: {record!r}")
    return objective_of({"objective": record["spec"]}, record.get("device"))


def _missing(x) -> bool:
    return x is None or x != x  # None or NaN (a missing cell of trials.csv)
