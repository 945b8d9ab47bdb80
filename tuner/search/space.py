"""The search space: the one map between Optuna parameters and schedules.

Parameter names are stable (committed studies decode with them): per forward block k
`b{k}_mode` (segments | frontier; absent = segments, as in studies made before frontier mode),
`b{k}_init`, `b{k}_log_tol` (the block's early-stop tolerance as log10, continuous; below
EXACT_BELOW it means 0, exact: absent for a sequential block, which has no tolerance), for
segments `b{k}_segments`, `b{k}_anderson` and, where the tolerance is exact, `b{k}_iters_s{S}`
(the pass budget; its range depends on the segment count S, hence one name per S), for frontier
`b{k}_window` (its pass bound is T: the tolerance decides when a block is done). Studies made before per-block
tolerances hold one categorical `tol` shared by all blocks instead; it still decodes (a per-block
value wins where both exist). The search suggests through `suggest`, seeds enter through
`params_of`, the refinement moves one block's tolerance through `log_tol_of` / `with_log_tol`,
trials.csv names its columns through `param_columns`, and the report decodes trials through
`schedule_from_params` / `plans_from_row`: nothing else knows the names.

Why per block and continuous: the tolerance a block can afford differs by block (the easy
blocks' drift stays far below the tough block's at the same tolerance), and a categorical grid
with steps x3 apart let the last refinement jump from feasible to infeasible with nothing in
between (patch-2 model: 3e-2 held 0.42/255, 1e-1 drifted 3.75/255 on fresh noise).

Why a segment stopped by a tolerance has no budget below its length: the tolerance is checked on
the whole batch, so a batch holding a hard sample keeps iterating until that sample has
converged; a budget cuts it off there instead. On the patch-2 model one fresh sample in 1,024
needed 61 passes in the tough block at tol 1e-2 where the calibration set needed 44; every
candidate with the old budget (the profile's need at 1e-4, + 1: 45) left it 20.8/255 off, and the
tune exported nothing. Without the budget that batch took 77 passes instead of 61 and the sample
0.03/255. A budget saves passes only by leaving samples unconverged, which is what a drift limit
forbids, so it is searched only where nothing else stops a segment (an exact tolerance). Studies
made before this hold a budget for every segment; it still decodes.
"""

from __future__ import annotations

import math

from tarflow.schedule import BlockPlan, Schedule

SEGMENT_CHOICES = (1, 2, 4, 8)  # plus T (sequential block); only counts <= T
TOL_CHOICES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the shared `tol` of older studies (decode only)
LOG_TOL_RANGE = (-5.0, 0.5)  # b{k}_log_tol: log10 of the tolerance; 10^0.5 stops the easy blocks after 1-3 passes
EXACT_BELOW = -4.5  # a log tolerance below this is 0 (exact): the lowest tenth of the range
ANDERSON_CHOICES = (0, 2, 3)  # Anderson history per block (0 = plain Jacobi)
INIT_CHOICES = ("zeros", "z")  # plus "calibrated" where the profile fitted its guesses (`inits_for`)
MODES = ("segments", "frontier")
CSV_PREFIX = "param_"  # how trials.csv prefixes parameter columns


class SearchSpace:
    """Per-block schedules of a model with B blocks and T tokens. `profile` (tuner.measure.profile.Profile)
    bounds the pass budgets; decoding needs no profile."""

    def __init__(self, B: int, T: int, profile=None, modes: tuple[str, ...] = MODES, inits: tuple[str, ...] | None = None):
        self.B, self.T, self.profile, self.modes = B, T, profile, tuple(modes)
        self.inits = tuple(inits) if inits is not None else self.inits_for(profile, B)
        self.segment_choices = sorted({s for s in SEGMENT_CHOICES if s <= T} | {T})
        self.window_choices = sorted({2 ** i for i in range(3, T.bit_length()) if 2 ** i < T} | {T})

    @classmethod
    def for_model(cls, model, profile=None, modes: tuple[str, ...] = MODES,
                  inits: tuple[str, ...] | None = None) -> "SearchSpace":
        return cls(model.cfg.num_blocks, model.cfg.num_patches, profile, modes, inits)

    @staticmethod
    def inits_for(profile, B: int) -> tuple[str, ...]:
        """The initial guesses a search offers: `calibrated` too where the profile fitted one for
        every block (studies/inits: it saved passes to 1e-3 on both MNIST models; the search
        decides whether it wins here). A study keeps the choices it was created with (Optuna
        refuses a categorical that changes), see `tuner.search.run`."""
        fitted = len(getattr(profile, "guesses", None) or {}) == B
        return INIT_CHOICES + (("calibrated",) if fitted else ())

    def iters_cap(self, k: int, S: int) -> int:
        """Budget range top of an exact segment: what the measured curves needed to reach 1e-4
        (+1), at most L."""
        L = -(-self.T // S)
        need = max(self.profile.iters_needed(k, S, init, 1e-4) for init in self.inits)
        return max(1, min(L, need + 1))

    def suggest(self, trial, name: str, fingerprint=None) -> Schedule:
        params = {}
        for k in range(self.B - 1, -1, -1):
            mode = trial.suggest_categorical(f"b{k}_mode", self.modes) if len(self.modes) > 1 else self.modes[0]
            params[f"b{k}_mode"] = mode
            params[f"b{k}_init"] = trial.suggest_categorical(f"b{k}_init", self.inits)
            if mode == "frontier":
                params[f"b{k}_window"] = trial.suggest_categorical(f"b{k}_window", self.window_choices)
            else:
                S = trial.suggest_categorical(f"b{k}_segments", self.segment_choices)
                params[f"b{k}_segments"] = S
                params[f"b{k}_anderson"] = trial.suggest_categorical(f"b{k}_anderson", ANDERSON_CHOICES)
                if S < self.T:  # token by token has no tolerance, and a budget of 1
                    params[f"b{k}_log_tol"] = trial.suggest_float(f"b{k}_log_tol", *LOG_TOL_RANGE)
                if S == self.T or params[f"b{k}_log_tol"] < EXACT_BELOW:  # only then a budget stops it
                    params[f"b{k}_iters_s{S}"] = trial.suggest_int(f"b{k}_iters_s{S}", 1, self.iters_cap(k, S))
                continue
            params[f"b{k}_log_tol"] = trial.suggest_float(f"b{k}_log_tol", *LOG_TOL_RANGE)
        return self.schedule_from_params(params, name, fingerprint)

    @staticmethod
    def tol_of(log_tol: float) -> float:
        """A log tolerance as the tolerance a plan gets: 0 below EXACT_BELOW, else 10^x to three
        significant digits (so a schedule's tolerance survives params_of and back unchanged)."""
        return 0.0 if log_tol < EXACT_BELOW else float(f"{10.0 ** log_tol:.3g}")

    @staticmethod
    def log_tol(tol: float) -> float:
        """The parameter value of a tolerance (clipped to the range; 0 is the range's bottom)."""
        if tol <= 0:
            return LOG_TOL_RANGE[0]
        return min(max(round(math.log10(tol), 6), EXACT_BELOW), LOG_TOL_RANGE[1])

    def log_tol_of(self, params: dict, k: int) -> float:
        """Block k's log tolerance in `params` (its own, else the older studies' shared `tol`)."""
        if f"b{k}_log_tol" in params:
            return float(params[f"b{k}_log_tol"])
        return self.log_tol(float(params.get("tol", 0.0)))

    def with_log_tol(self, params: dict, k: int, log_tol: float) -> dict:
        """`params` with block k's tolerance moved to `log_tol`, every other block's kept (an older
        study's shared `tol` becomes one value per block). Moved to a tolerance, block k's
        segments lose their budget (they run to the tolerance); moved to exact, they keep it."""
        plans = self.plans_of(params)
        out = {key: v for key, v in params.items() if key != "tol" and not key.endswith("_log_tol")}
        for p in plans:
            if p.mode == "frontier" or p.segments < self.T:
                out[f"b{p.block}_log_tol"] = self.log_tol_of(params, p.block)
        p = next(p for p in plans if p.block == k)
        if p.mode != "frontier" and p.segments < self.T:  # a budget only where the tolerance is exact
            key = f"b{k}_iters_s{p.segments}"
            out.pop(key, None)
            if log_tol < EXACT_BELOW:
                out[key] = params.get(key, p.max_iters)
        return out | {f"b{k}_log_tol": float(log_tol)}

    def _tol(self, params: dict, k: int) -> float:
        """Block k's own tolerance, else an older study's shared `tol` (which its token-by-token
        blocks carried too, as their exported schedules show), else 0 (a token-by-token block)."""
        if f"b{k}_log_tol" in params:
            return self.tol_of(float(params[f"b{k}_log_tol"]))
        return float(params.get("tol", 0.0))

    @property
    def _default_mode(self) -> str:
        """A trial's mode where it has no `b{k}_mode`: a one-mode search's mode (it is not a
        parameter there), else segments (studies from before frontier mode)."""
        return self.modes[0] if len(self.modes) == 1 else "segments"

    def schedule_from_params(self, params: dict, name: str = "trial", fingerprint=None) -> Schedule:
        """The schedule of `params`, carrying the profile's fitted guess for each block whose init
        is `calibrated` (a space without a profile cannot make those: see `plans_of`)."""
        guesses = getattr(self.profile, "guesses", None) or {}  # Schedule keeps those its plans use
        return Schedule(plans=self.plans_of(params), fingerprint=fingerprint, name=name, guesses=guesses)

    def plans_of(self, params: dict) -> tuple[BlockPlan, ...]:
        """The block plans of `params`, sampling order: what decoding for a table or a figure
        needs (no fitted numbers)."""
        plans = []
        for k in range(self.B - 1, -1, -1):
            init, tol = str(params[f"b{k}_init"]), self._tol(params, k)
            if params.get(f"b{k}_mode", self._default_mode) == "frontier":
                plans.append(BlockPlan(k, 1, self.T, init, tol, mode="frontier", window=int(params[f"b{k}_window"])))
                continue
            S = int(params[f"b{k}_segments"])
            budget = params.get(f"b{k}_iters_s{S}", -(-self.T // S))  # none: the segment's length
            plans.append(BlockPlan(k, S, int(budget), init, tol,
                                   anderson=int(params.get(f"b{k}_anderson", 0))))
        return tuple(plans)

    def params_of(self, sched: Schedule) -> dict:
        """A schedule as search parameters (budgets and tolerances clipped to the search range)."""
        params = {}
        for p in sched.plans:
            if p.mode not in self.modes:
                raise ValueError(f"a {p.mode} plan is outside a search over {', '.join(self.modes)}")
            params[f"b{p.block}_init"] = p.init
            if len(self.modes) > 1:
                params[f"b{p.block}_mode"] = p.mode
            if p.mode == "frontier":
                params[f"b{p.block}_window"] = min(self.window_choices, key=lambda w: abs(w - p.window))
                params[f"b{p.block}_log_tol"] = self.log_tol(p.tol)
                continue
            S = p.segments if p.segments in self.segment_choices else min(
                self.segment_choices, key=lambda s: abs(s - p.segments))
            params[f"b{p.block}_segments"] = S
            params[f"b{p.block}_anderson"] = min(ANDERSON_CHOICES, key=lambda m: abs(m - p.anderson))
            if S < self.T:
                params[f"b{p.block}_log_tol"] = self.log_tol(p.tol)
            if S == self.T or params[f"b{p.block}_log_tol"] < EXACT_BELOW:
                params[f"b{p.block}_iters_s{S}"] = min(p.max_iters, self.iters_cap(p.block, S))
        return params

    @staticmethod
    def param_columns(params: dict) -> dict:
        """A trial's parameters as trials.csv columns (the inverse of `params_from_row`)."""
        return {f"{CSV_PREFIX}{k}": v for k, v in params.items()}

    @staticmethod
    def params_from_row(row: dict) -> dict:
        """The parameters a trials.csv row holds (empty cells dropped)."""
        return {k[len(CSV_PREFIX):]: v for k, v in row.items()
                if k.startswith(CSV_PREFIX) and v == v and v is not None}  # v == v drops NaN

    def plans_from_row(self, row: dict) -> list[dict] | None:
        """A trials.csv row's schedule as plan dicts (sampling order); None if it has no parameters."""
        params = self.params_from_row(row)
        try:
            params = params | {k: int(float(v)) for k, v in params.items() if k.endswith(("_anderson", "_window"))}
            return [vars(p) for p in self.plans_of(params)]
        except (KeyError, TypeError, ValueError):
            return None
