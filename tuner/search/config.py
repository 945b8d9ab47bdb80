"""The tune's configuration: every option of a search, validated before any work."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from tarflow.errors import UserError
from tarflow.settings import SamplingSettings

MIN_DRIFT_VERIFY_N = 256  # a per-sample limit is re-checked on at least this many fresh samples
VERIFY_CANDIDATES = 10  # feasible trials the final verification tries, best first, until one holds: the
# refinement screens its steps on a quarter of the verification noise's batches (tuner.search.fresh), so
# its last steps may drift past the limit on the rest (a failing check stops at the first batch over it)
REFINE_TRIALS = 12  # at most this many of --trials (and at most a third) bisect the best schedule's
# per-block tolerances (tuner.search.refine): one trial per step, about 3 steps per block


@dataclass(frozen=True)
class TuneConfig:
    tolerance: float = 10.0  # allowed FID increase over sequential (same noise, same n)
    trials: int = 30  # with the model seed and the refinement, 30 found fewer passes than 50 without
    timeout: float | None = None  # seconds for the trial loop
    batch: int = 16  # latency is measured for this batch size
    n: int = 256  # FID samples per trial (a multiple of batch); the drift limit binds first
    verify_n: int = 1024  # >= 2n, for the re-verification of the winner
    extractor: str = "mnist-cnn"
    verify_extractor: str = "mnist-cnn"
    prune_rmse: float = 12.0  # pixel RMSE (0-255) on the warm-up batch above which a trial is pruned
    objective: str = "latency"  # latency (measured here), passes (serial passes per batch) or cost:DEVICE.json
    max_drift: float | None = None  # per-sample pixel RMSE (0-255) vs sequential, max over samples
    modes: tuple[str, ...] = ("segments", "frontier")  # block modes the search may choose
    heartbeat: int = 60  # seconds; a trial silent for 2x this is taken as dead (see open_storage)
    storage_retry: float = 300.0  # seconds a worker rides out a lost storage before ending (tuner.search.outage)
    retime_rounds: int = 3  # interleaved rounds re-timing the winner against the seeds after export (>= 1)
    solver: str = "auto"  # the transformer step every run uses (tarflow.solvers); auto: graphs on CUDA
    seed: int = 0
    sampling: SamplingSettings = SamplingSettings()  # what is sampled: every run of the search uses it
    floor_seeds: tuple[int, ...] = (101, 102, 103)

    def __post_init__(self):
        """Impossible options are refused before any work (each message names the setting)."""
        if self.trials < 1 or self.tolerance < 0 or self.batch < 1 or self.heartbeat < 1:
            raise UserError(f"trials, batch and heartbeat must be >= 1 and tolerance >= 0, got "
                            f"{self.trials}, {self.batch}, {self.heartbeat}, {self.tolerance:g}",
                            setting="trials,batch,heartbeat,tolerance")
        if self.retime_rounds < 1:
            raise UserError(f"retime_rounds must be >= 1, got {self.retime_rounds}", setting="retime_rounds")
        if not self.storage_retry >= 0:  # also refuses NaN
            raise UserError(f"storage_retry must be >= 0 seconds, got {self.storage_retry:g}", setting="storage_retry")
        if self.n % self.batch or self.verify_n < 2 * self.n:
            raise UserError(f"n ({self.n}) must be a multiple of batch ({self.batch}) and "
                            f"verify_n ({self.verify_n}) at least 2x n", setting="n,batch,verify_n")
        if self.max_drift is not None and (self.max_drift < 0 or self.verify_n < MIN_DRIFT_VERIFY_N):
            raise UserError(f"max_drift must be >= 0 and is re-checked on fresh noise with verify_n >= "
                            f"{MIN_DRIFT_VERIFY_N} (got {self.max_drift:g}, {self.verify_n})", setting="max_drift,verify_n")
        self.goal  # an unknown objective or a bad device profile fails before any work

    def as_record(self) -> dict:
        """The options as summary.json records them (sampling has its own field)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sampling"}

    @cached_property
    def goal(self):
        """The objective as an object (value, unit, label): parsed and its files read once."""
        from tuner.search.objectives import parse_objective

        return parse_objective(self.objective)

    @property
    def refine_trials(self) -> int:
        """Trials the refinement may use: the last third of --trials, at most REFINE_TRIALS."""
        return min(REFINE_TRIALS, self.trials // 3)

    @property
    def screen_n(self) -> int:
        """Fresh samples the refinement screens a step on: a quarter of verify_n, at least the
        MIN_DRIFT_VERIFY_N a drift limit asks for (verify_n itself when that is no fewer)."""
        return min(self.verify_n, max(MIN_DRIFT_VERIFY_N, self.verify_n // 4))

    @property
    def cost_model(self):
        """The device profile a cost:FILE objective prices passes with (None otherwise)."""
        return getattr(self.goal, "profile", None)
