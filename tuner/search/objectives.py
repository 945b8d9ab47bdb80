"""What the search minimises, as objects: each objective knows how it reads its value off a
sampler run, the unit that value is in, how to show it, and which device it speaks for.

Before this module the objective was a string that five modules dispatched on, and a pass
count was printed as milliseconds. Everything that shows or stores an objective value (the
search, the summary, the verdict lines, the report's tables, cards and axes) asks the objective
instead. A trial's stored value is in the objective's *base* unit (seconds for latency and
modelled cost, serial passes for passes); `display` converts to the shown unit (ms, passes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tarflow.errors import UserError

NAMES = ("latency", "passes")  # plus cost:DEVICE.json


@dataclass(frozen=True)
class RunCounts:
    """What one sampled batch (or several) cost, as the objectives read it."""

    batches: int  # batches sampled
    passes: int  # serial transformer passes, summed over the batches
    median_s: float | None  # measured median seconds per batch (None if not timed)
    modelled_s: float | None = None  # device-profile seconds per batch (cost objective only)


@dataclass(frozen=True)
class Objective:
    """Base: the measured sampling latency on this device (`latency`)."""

    name: str = "latency"
    unit: str = "ms per batch"  # of the displayed number
    label: str = "latency"  # short noun for tables and cards
    scale: float = 1e3  # displayed = stored x scale
    digits: int = 1
    measured: bool = True  # the value is a wall-clock time taken here

    def value(self, run: RunCounts) -> float:
        """The stored trial value of a run (base unit)."""
        return run.median_s

    def display(self, value: float | None) -> float | None:
        return None if value is None else value * self.scale

    def format(self, value: float | None, with_unit: bool = True) -> str:
        if value is None:
            return "-"
        text = f"{self.display(value):.{self.digits}f}"
        return f"{text} {self.short_unit}" if with_unit else text

    @property
    def short_unit(self) -> str:
        return self.unit.split(" per ")[0]

    def unit_for(self, batch: int) -> str:
        """The unit with its batch, for column headers and axis titles."""
        return f"{self.unit} of {batch}"

    def device_name(self, here: str) -> str | None:
        """The device the value speaks for (`here`: this machine's name)."""
        return here

    def describe(self) -> dict:
        """What summary.json and the schedule's provenance record about the objective."""
        return {"name": self.name, "unit": self.unit, "label": self.label, "measured": self.measured}


@dataclass(frozen=True)
class Passes(Objective):
    """Serial transformer passes per batch: what a latency-bound GPU pays; deterministic."""

    name: str = "passes"
    unit: str = "serial passes per batch"
    label: str = "serial passes"
    scale: float = 1.0
    digits: int = 1
    measured: bool = False

    def value(self, run: RunCounts) -> float:
        return run.passes / run.batches

    @property
    def short_unit(self) -> str:
        return "passes"

    def device_name(self, here: str) -> str | None:
        return None  # a count, true on any device


@dataclass(frozen=True)
class Cost(Objective):
    """Latency modelled from a device profile measured elsewhere (`cost:DEVICE.json`)."""

    name: str = "cost"
    unit: str = "modelled ms per batch"
    label: str = "modelled latency"
    measured: bool = False
    path: str = ""
    profile: object = field(default=None, compare=False, repr=False)  # the loaded DeviceProfile

    def value(self, run: RunCounts) -> float:
        return run.modelled_s

    @property
    def short_unit(self) -> str:
        return "ms"

    def device_name(self, here: str) -> str | None:
        return self.profile.device["device_name"]

    def describe(self) -> dict:
        return super().describe() | {"device_profile": self.path, "device": self.device_name("")}


def parse_objective(text: str) -> Objective:
    """`latency`, `passes` or `cost:DEVICE.json` as an objective; a bad name or an unreadable
    device profile is one line naming the setting."""
    if text == "latency":
        return Objective()
    if text == "passes":
        return Passes()
    if text.startswith("cost:"):
        from tuner.measure.device_profile import DeviceProfile

        path = text[len("cost:"):]
        prof = DeviceProfile.load(path)  # read once, here
        dev = prof.device["device_name"]
        return Cost(name=text, unit=f"modelled ms per batch on {dev}", label=f"modelled latency on {dev}",
                    path=Path(path).name, profile=prof)
    raise UserError(f"objective must be one of {', '.join(NAMES)} or cost:DEVICE.json, got {text!r}")


def objective_of(config: dict) -> Objective:
    """The objective a stored study config names, for readers of finished studies (the report):
    a cost objective whose device-profile file is not at hand still gets its units."""
    text = str(config.get("objective", "latency"))
    if text.startswith("cost:") and not Path(text[len("cost:"):]).is_file():
        name = Path(text[len("cost:"):]).name
        return Cost(name=text, unit=f"modelled ms per batch ({name})", label=f"modelled latency ({name})",
                    path=name)
    return parse_objective(text)
