"""The schedule file: the only contract between the tuner and the sampler.

A `Schedule` lists one `BlockPlan` per flow block in *sampling order* (entry 0 is the block
sampled first, i.e. forward block B-1). It round-trips through sorted, indented JSON with a
schema version and a model fingerprint, and is validated on load with one-line messages.

Built-in names, with optional inline parameters (`name:key=value,...`):
  sequential                       every block token by token (the exact reference)
  jacobi:segments=1,max_iters=T,init=zeros,tol=0,anderson=0   one plan for every block
  sejd:tol=0.05,init=zeros,anderson=0   block sampled first sequential, the rest one-segment Jacobi
                                   with early stop on the max-norm update (after arXiv 2505.24791)
  frontier:window=T,tol=0,init=zeros,max_passes=T   every block in frontier mode

Init `calibrated` needs numbers fitted to the model (`tarflow.guess.CalibratedGuess`, made by
the tuner's profile); a schedule using it carries them under `guesses` and is written as schema
version 4. Every other schedule is still written as version 3, so tools that predate the
calibrated guess keep reading it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .checkpoint import atomic_write_text
from .errors import UserError
from .guess import CalibratedGuess
from .settings import SamplingSettings

# 2 added `anderson`, 3 the frontier mode (`mode`, `window`), 4 `guesses` (init calibrated);
# a file is written at the lowest version that can say it (3 without guesses); 1..3 still load
SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MODES = ("segments", "frontier")
# initial Jacobi guess: zeros (token 0 kept), the block's input noise z, or the fitted line
# offset + scale * z the schedule carries (`tarflow.guess`)
INITS = ("zeros", "z", "calibrated")
FITTED_INITS = ("calibrated",)  # need numbers fitted to the model, carried in `Schedule.guesses`
TOP_KEYS = ("schema_version", "name", "fingerprint", "blocks", "provenance", "guesses")
ANDERSON_MAX = 5  # longest Anderson history a plan may ask for
PLAN_KEYS = ("block", "segments", "max_iters", "init", "tol", "anderson", "mode", "window")


@dataclass(frozen=True)
class BlockPlan:
    """How one flow block is solved.

    mode "segments" (GS-Jacobi): segments: Gauss-Seidel segments (1..T, need not divide T;
    T = token by token, the sequential path). max_iters: parallel passes per segment (>= segment
    length makes it exact). init: initial guess. tol: a segment stops when the plain Jacobi update
    max |G(x) - x| over the segment and batch is <= tol. anderson: Anderson history m (0 = off).

    mode "frontier": window: tokens run per pass after the frontier (1..T); tol: the longest
    prefix whose update is <= tol is accepted each pass; max_iters: the block's pass bound (at
    the bound the tokens past the frontier keep their latest iterate, as a spent Jacobi budget
    does); init: initial guess. segments stays 1 and anderson 0. See `solve_frontier`.
    """

    block: int
    segments: int
    max_iters: int
    init: str = "zeros"
    tol: float = 0.0
    anderson: int = 0
    mode: str = "segments"
    window: int = 0  # frontier mode only

    def __post_init__(self):
        """A plan is valid the moment it exists; fitting a model is `Schedule.check_fits`."""
        for k in ("block", "segments", "max_iters", "anderson", "window"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"'{k}' must be an integer, got {v!r}")
        if self.block < 0:
            raise UserError(f"block must be >= 0, got {self.block}")
        if self.segments < 1:
            raise UserError(f"segments must be >= 1, got {self.segments}")
        if self.max_iters < 1:
            raise UserError(f"max_iters must be >= 1, got {self.max_iters}")
        if self.init not in INITS:
            raise UserError(f"unknown init {self.init!r} (choose from {', '.join(INITS)})")
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise UserError(f"tol must be a finite number >= 0, got {tol!r}")
        object.__setattr__(self, "tol", float(tol))
        if not 0 <= self.anderson <= ANDERSON_MAX:
            raise UserError(f"anderson must be 0 (off) .. {ANDERSON_MAX}, got {self.anderson}")
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.mode == "frontier" and (self.window < 1 or self.segments != 1 or self.anderson):
            raise UserError("a frontier plan needs window >= 1 and takes neither segments nor anderson, "
                            f"got window={self.window}, segments={self.segments}, anderson={self.anderson}")
        if self.mode == "segments" and self.window:
            raise UserError(f"window applies to mode 'frontier' only (this plan is 'segments'), got {self.window}")

    def to_dict(self) -> dict:
        """The fields that apply to the plan's mode (a segments plan reads as in schema 2)."""
        d = asdict(self)
        if self.mode == "segments":
            del d["mode"], d["window"]
        else:
            del d["segments"], d["anderson"]
        return d


@dataclass(frozen=True)
class Schedule:
    """Plans in sampling order, the model they were made for and, for blocks whose init is
    `calibrated`, that block's fitted guess (forward block index -> CalibratedGuess). Guesses
    for blocks that do not use them are dropped, so the search can hand over a profile's all."""

    plans: tuple[BlockPlan, ...]  # sampling order
    fingerprint: dict | None = None
    name: str = "custom"
    provenance: dict = field(default_factory=dict)
    guesses: dict = field(default_factory=dict)

    def __post_init__(self):
        """A plan with init calibrated and no guess is refused here, not halfway into a sample."""
        need = {p.block for p in self.plans if p.init == "calibrated"}
        missing = sorted(need - set(self.guesses))
        if missing:
            raise UserError(f"schedule '{self.name}': block {missing[0]} has init 'calibrated' but the schedule "
                            "carries no calibrated guess for it (fit one with the tuner's profile)")
        object.__setattr__(self, "guesses", {b: self.guesses[b] for b in sorted(need)})

    @property
    def schema_version(self) -> int:
        """The lowest version that can say this schedule: 4 with guesses, else 3."""
        return SCHEMA_VERSION if self.guesses else 3

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "schema_version": self.schema_version,
            "name": self.name,
            "fingerprint": copy.deepcopy(self.fingerprint),
            "blocks": [p.to_dict() for p in self.plans],
            "provenance": copy.deepcopy(self.provenance),
        }
        if self.guesses:
            d["guesses"] = {str(b): g.to_dict() for b, g in self.guesses.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "schedule") -> "Schedule":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return cls.from_dict(obj, source)

    @classmethod
    def from_dict(cls, obj, source: str = "schedule") -> "Schedule":
        if not isinstance(obj, dict):
            raise UserError(f"{source}: expected a JSON object")
        version = obj.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise UserError(f"{source}: unknown schema_version {version!r} "
                            f"(this tool reads {', '.join(map(str, READABLE_VERSIONS))})")
        blocks = obj.get("blocks")
        if not isinstance(blocks, list) or not blocks:
            raise UserError(f"{source}: 'blocks' must be a non-empty list")
        unknown = set(obj) - (set(TOP_KEYS) - ({"guesses"} if version < 4 else set()))
        if unknown:
            raise UserError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}")
        plans = tuple(_plan_from_dict(b, f"{source}: blocks[{i}]") for i, b in enumerate(blocks))
        guesses = _guesses_from_dict(obj.get("guesses", {}), f"{source}: guesses")
        fp = obj.get("fingerprint")
        if fp is not None and not isinstance(fp, dict):
            raise UserError(f"{source}: 'fingerprint' must be an object or null")
        prov = obj.get("provenance") or {}
        if not isinstance(prov, dict):
            raise UserError(f"{source}: 'provenance' must be an object")
        name = str(obj.get("name", "custom"))
        try:
            return cls(plans=plans, fingerprint=fp, name=name, provenance=prov, guesses=guesses)
        except UserError as e:
            raise UserError(f"{source}: {e}", setting=e.setting) from None

    @classmethod
    def load(cls, path) -> "Schedule":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"cannot read schedule {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: malformed JSON (not UTF-8 text)") from None
        return cls.from_json(text, str(path))

    # --- model fit ----------------------------------------------------------------------
    def check_fits(self, model, force: bool = False) -> None:
        """Refuse a schedule that does not fit the model (fingerprint: unless force)."""
        B, T = model.cfg.num_blocks, model.cfg.num_patches
        if len(self.plans) != B:
            raise UserError(f"schedule '{self.name}' has {len(self.plans)} blocks but the model has {B}")
        for i, p in enumerate(self.plans):
            if p.block != B - 1 - i:
                raise UserError(f"schedule '{self.name}': entry {i} names block {p.block}, expected "
                                f"{B - 1 - i} (entries are in sampling order, last block first)")
            if p.segments > T or p.window > T:
                what = f"segments={p.segments}" if p.segments > T else f"window={p.window}"
                raise UserError(f"schedule '{self.name}': block {p.block} {what} "
                                f"exceeds the sequence length T={T}")
        for b, g in self.guesses.items():
            if g.shape != (T, model.cfg.token_dim):
                raise UserError(f"schedule '{self.name}': the calibrated guess of block {b} is {g.shape[0]}x"
                                f"{g.shape[1]}, the model has {T} tokens of {model.cfg.token_dim} values")
        fp = model.fingerprint
        if not force and self.fingerprint is not None and fp is not None and self.fingerprint != fp:
            what = "architecture" if self.fingerprint.get("arch") != fp.get("arch") else "weights"
            raise UserError(f"schedule '{self.name}' was made for another model ({what} differ); "
                            "pass force=True to run it anyway", setting="force")

    @property
    def sampling(self) -> SamplingSettings | None:
        """The sampling settings the schedule was tuned under (None if it does not say)."""
        rec = self.provenance.get("sampling")
        return None if rec is None else SamplingSettings.from_dict(rec, f"schedule '{self.name}' provenance.sampling")

    def is_sequential(self, T: int) -> bool:
        """Every block token by token: the exact reference."""
        return all(p.segments == T for p in self.plans)

    def with_provenance(self, **kv) -> "Schedule":
        return replace(self, provenance={**self.provenance, **kv})


def _guesses_from_dict(d, where: str) -> dict:
    """{"3": {...}} -> {3: CalibratedGuess}; keys are forward block indices."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected an object keyed by block index")
    out = {}
    for key, g in d.items():
        if not key.isdigit():
            raise UserError(f"{where}: key {key!r} is not a block index")
        out[int(key)] = CalibratedGuess.from_dict(g, f"{where}.{key}")
    return out


def _plan_from_dict(d, where: str) -> BlockPlan:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected an object")
    unknown = set(d) - set(PLAN_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    needed = ("block", "max_iters", "window") if d.get("mode") == "frontier" else ("block", "segments", "max_iters")
    missing = [k for k in needed if k not in d]
    if missing:
        raise UserError(f"{where}: missing '{missing[0]}'")
    return _plan(where, **({"segments": 1} | d))


def _plan(where: str, *args, **kwargs) -> BlockPlan:
    """A BlockPlan whose validation message says where the plan came from."""
    try:
        return BlockPlan(*args, **kwargs)
    except UserError as e:
        raise UserError(f"{where}: {e}", setting=e.setting) from None


# --- built-in named schedules -----------------------------------------------------------

def _params(text: str, allowed: dict, name: str) -> dict:
    """Parse 'a=1,b=zeros' with the types of `allowed`'s defaults."""
    out = dict(allowed)
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
            raise UserError(f"schedule '{name}': unknown parameter '{key}' ({takes})")
        kind = type(allowed[key]) if allowed[key] is not None else int
        try:
            out[key] = kind(val) if kind is not str else val
        except ValueError:
            raise UserError(f"schedule '{name}': {key}={val!r} is not a {kind.__name__}") from None
    return out


def builtin_schedule(spec: str, model) -> Schedule:
    """Resolve 'sequential', 'jacobi:...' or 'sejd:...' for `model`."""
    name, _, args = spec.partition(":")
    B, T = model.cfg.num_blocks, model.cfg.num_patches
    order = range(B - 1, -1, -1)
    if name == "sequential":
        _params(args, {}, name)
        plans = [BlockPlan(k, T, 1) for k in order]
    elif name == "jacobi":
        p = _params(args, {"segments": 1, "max_iters": None, "init": "zeros", "tol": 0.0, "anderson": 0}, name)
        if p["max_iters"] is None:  # one pass per token of the longest segment: exact
            p["max_iters"] = -(-T // max(1, p["segments"]))
        plans = [_plan(f"schedule '{spec}'", k, **p) for k in order]
    elif name == "sejd":
        p = _params(args, {"tol": 0.05, "init": "zeros", "max_iters": T, "anderson": 0}, name)
        plans = [BlockPlan(k, T, 1) if i == 0 else _plan(f"schedule '{spec}'", k, 1, **p)
                 for i, k in enumerate(order)]
    elif name == "frontier":
        p = _params(args, {"window": T, "tol": 0.0, "init": "zeros", "max_passes": T}, name)
        plans = [_plan(f"schedule '{spec}'", k, 1, p["max_passes"], p["init"], p["tol"], mode="frontier",
                       window=p["window"]) for k in order]
    else:
        raise UserError(f"unknown schedule '{spec}': give a JSON file or one of sequential, jacobi, sejd, "
                        "frontier")
    if any(p.init == "calibrated" for p in plans):
        raise UserError(f"schedule '{spec}': init 'calibrated' needs a guess fitted to the model, which a "
                        "built-in schedule does not carry (use a tuned schedule file)")
    return Schedule(plans=tuple(plans), fingerprint=model.fingerprint, name=spec)


def resolve_schedule(spec, model, force: bool = False) -> Schedule:
    """A schedule from a file path or a built-in name, checked against the model."""
    if isinstance(spec, Schedule):
        sched = spec
    elif Path(str(spec)).suffix == ".json" or Path(str(spec)).is_file():
        sched = Schedule.load(spec)
    else:
        sched = builtin_schedule(str(spec), model)
    sched.check_fits(model, force=force)
    return sched
