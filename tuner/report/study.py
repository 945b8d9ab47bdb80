"""Reading a study folder into typed objects: the report's only input (it never runs the model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tarflow.errors import UserError
from tarflow.schedule import Schedule

from tuner.measure.pictures import PICTURES_JSON
from tuner.measure.profile import Profile
from tuner.search.objectives import Objective
from tuner.search.space import SearchSpace
from tuner.search.summary import StudySummary

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Pictures:
    """What `tune` wrote into pictures/: PNG bytes and what they show (see tuner.measure.pictures)."""

    info: dict
    png: dict[str, bytes] = field(default_factory=dict)

    @property
    def schedule(self) -> dict | None:
        return self.info.get("schedule")


@dataclass
class StudyFolder:
    path: Path
    summary: StudySummary
    trials: pd.DataFrame | None
    profile: Profile | None
    schedule: Schedule | None
    pictures: Pictures | None
    notes: list[str]

    @property
    def arch(self) -> dict:
        return self.summary.model["arch"]

    @property
    def B(self) -> int:
        return int(self.arch["num_blocks"])

    @property
    def T(self) -> int:
        return (int(self.arch["img_size"]) // int(self.arch["patch_size"])) ** 2

    @property
    def goal(self) -> Objective:
        """What the search minimised: every objective value the report shows is shown by it."""
        return self.summary.goal

    @property
    def space(self) -> SearchSpace:
        return SearchSpace(self.B, self.T)

    @property
    def search_fid(self) -> tuple[str, int]:
        return self.summary.sequential.extractor, self.summary.sequential.n


def read_study(study_dir) -> StudyFolder:
    """Everything `tune` wrote into `study_dir`; UserError when it is not a study folder."""
    d = Path(study_dir)
    if not d.is_dir() or not (d / "summary.json").is_file():
        raise UserError(f"not a tarflow-tuner study folder: {d} (no summary.json)")
    summary = StudySummary.load(d / "summary.json")
    notes = []
    trials = None
    if (d / "trials.csv").is_file():
        try:
            trials = pd.read_csv(d / "trials.csv")
            trials = with_objective(trials, summary.goal)
        except Exception as e:  # pandas raises several types for bad CSV
            notes.append(f"trials.csv could not be read ({e})")
    else:
        notes.append("trials.csv is missing")
    profile = None
    if (d / "profile" / "profile.json").is_file():
        try:
            profile = Profile.load(d / "profile")
        except UserError as e:
            notes.append(str(e))
    else:
        notes.append("profile/profile.json is missing")
    schedule = None
    if (d / "schedule.json").is_file():
        schedule = Schedule.load(d / "schedule.json")
    elif summary.schedule:
        schedule = Schedule.from_dict(summary.schedule, f"{d / 'summary.json'}: schedule")
    pictures = read_pictures(d / "pictures")
    if pictures is None:
        notes.append("pictures/ is missing (written by `tune`)")
    return StudyFolder(d, summary, trials, profile, schedule, pictures, notes)


def with_objective(trials: pd.DataFrame, goal: Objective) -> pd.DataFrame:
    """trials.csv with its `objective` column (each trial's value in the objective's unit):
    tables written before that column existed come from latency studies, whose value was the
    measured latency; any other study without it gets an empty column rather than a wrong one."""
    if "objective" in trials:
        return trials
    timed = goal.measured and "latency_s" in trials
    return trials.assign(objective=trials["latency_s"] if timed else float("nan"))


def read_pictures(folder: Path) -> Pictures | None:
    try:
        info = json.loads((folder / PICTURES_JSON).read_text())
        names = ["sequential.png"] + (["schedule.png", "diff.png", "worst.png"] if info.get("schedule") else [])
        return Pictures(info, {n: (folder / n).read_bytes() for n in names})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def display_path(p) -> str:
    """A path as a reader should see it: relative to the current folder or the repo when possible."""
    p = Path(p)
    if not p.is_absolute():
        return p.as_posix()
    for base in (Path.cwd(), REPO_ROOT):
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return p.name  # never leak a machine's absolute layout into a shared report


def profile_inits(prof) -> list[str]:
    """The initial guesses a profile scored (its igm_<init> columns), in the profile's order: the
    calibrated guess is there only where the profile fitted one."""
    return [c.removeprefix("igm_") for c in prof.columns if c.startswith("igm_")]
