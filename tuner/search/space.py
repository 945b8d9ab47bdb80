"""The search space: the one map between Optuna parameters and schedules.

Parameter names are stable (committed studies decode with them): `tol`, and per forward block k
`b{k}_mode` (segments | frontier; absent = segments, as in studies made before frontier mode),
`b{k}_init`, for segments `b{k}_segments`, `b{k}_anderson` and `b{k}_iters_s{S}` (the pass
budget; its range depends on the segment count S, hence one name per S), for frontier
`b{k}_window` (its pass bound is T: the tolerance decides when a block is done). The search suggests through `suggest`,
seeds enter through `params_of`, trials.csv names its columns through `param_columns`, and the
report decodes trials through `schedule_from_params` / `plans_from_row`: nothing else knows the
names.
"""

from __future__ import annotations

from tarflow.schedule import BlockPlan, Schedule

SEGMENT_CHOICES = (1, 2, 4, 8)  # plus T (sequential block); only counts <= T
TOL_CHOICES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
ANDERSON_CHOICES = (0, 2, 3)  # Anderson history per block (0 = plain Jacobi)
INIT_CHOICES = ("zeros", "z")
MODES = ("segments", "frontier")
CSV_PREFIX = "param_"  # how trials.csv prefixes parameter columns


class SearchSpace:
    """Per-block schedules of a model with B blocks and T tokens. `profile` (tuner.measure.profile.Profile)
    bounds the pass budgets; decoding needs no profile."""

    def __init__(self, B: int, T: int, profile=None, modes: tuple[str, ...] = MODES):
        self.B, self.T, self.profile, self.modes = B, T, profile, tuple(modes)
        self.segment_choices = sorted({s for s in SEGMENT_CHOICES if s <= T} | {T})
        self.window_choices = sorted({2 ** i for i in range(3, T.bit_length()) if 2 ** i < T} | {T})

    @classmethod
    def for_model(cls, model, profile=None, modes: tuple[str, ...] = MODES) -> "SearchSpace":
        return cls(model.cfg.num_blocks, model.cfg.num_patches, profile, modes)

    def iters_cap(self, k: int, S: int) -> int:
        """Budget range top: what the measured curves needed to reach 1e-4 (+1), at most L."""
        L = -(-self.T // S)
        need = max(self.profile.iters_needed(k, S, init, 1e-4) for init in INIT_CHOICES)
        return max(1, min(L, need + 1))

    def suggest(self, trial, name: str, fingerprint=None) -> Schedule:
        params = {"tol": trial.suggest_categorical("tol", TOL_CHOICES)}
        for k in range(self.B - 1, -1, -1):
            mode = trial.suggest_categorical(f"b{k}_mode", self.modes) if len(self.modes) > 1 else self.modes[0]
            params[f"b{k}_mode"] = mode
            params[f"b{k}_init"] = trial.suggest_categorical(f"b{k}_init", INIT_CHOICES)
            if mode == "frontier":
                params[f"b{k}_window"] = trial.suggest_categorical(f"b{k}_window", self.window_choices)
                continue
            S = trial.suggest_categorical(f"b{k}_segments", self.segment_choices)
            params[f"b{k}_segments"] = S
            params[f"b{k}_anderson"] = trial.suggest_categorical(f"b{k}_anderson", ANDERSON_CHOICES)
            params[f"b{k}_iters_s{S}"] = trial.suggest_int(f"b{k}_iters_s{S}", 1, self.iters_cap(k, S))
        return self.schedule_from_params(params, name, fingerprint)

    @staticmethod
    def loosened(params: dict, steps: int = 2) -> list[dict]:
        """The same schedule stopped sooner: the tolerance 1..`steps` choices looser, nearest first."""
        i = TOL_CHOICES.index(float(params["tol"]))
        return [params | {"tol": t} for t in TOL_CHOICES[i + 1:i + 1 + steps]]

    def schedule_from_params(self, params: dict, name: str = "trial", fingerprint=None) -> Schedule:
        tol = float(params["tol"])
        plans = []
        for k in range(self.B - 1, -1, -1):
            init = str(params[f"b{k}_init"])
            if params.get(f"b{k}_mode", "segments") == "frontier":
                plans.append(BlockPlan(k, 1, self.T, init, tol, mode="frontier", window=int(params[f"b{k}_window"])))
                continue
            S = int(params[f"b{k}_segments"])
            plans.append(BlockPlan(k, S, int(params[f"b{k}_iters_s{S}"]), init, tol,
                                   anderson=int(params.get(f"b{k}_anderson", 0))))
        return Schedule(plans=tuple(plans), fingerprint=fingerprint, name=name)

    def params_of(self, sched: Schedule) -> dict:
        """A schedule as search parameters (budgets clipped to the search range)."""
        params = {"tol": min(TOL_CHOICES, key=lambda t: abs(t - sched.plans[-1].tol))}
        for p in sched.plans:
            if p.mode not in self.modes:
                raise ValueError(f"a {p.mode} plan is outside a search over {', '.join(self.modes)}")
            params[f"b{p.block}_init"] = p.init
            if len(self.modes) > 1:
                params[f"b{p.block}_mode"] = p.mode
            if p.mode == "frontier":
                params[f"b{p.block}_window"] = min(self.window_choices, key=lambda w: abs(w - p.window))
                continue
            S = p.segments if p.segments in self.segment_choices else min(
                self.segment_choices, key=lambda s: abs(s - p.segments))
            params[f"b{p.block}_segments"] = S
            params[f"b{p.block}_anderson"] = min(ANDERSON_CHOICES, key=lambda m: abs(m - p.anderson))
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
            return [vars(p) for p in self.schedule_from_params(params).plans]
        except (KeyError, TypeError, ValueError):
            return None
