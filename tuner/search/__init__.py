"""The search: `config` (TuneConfig), `objectives` (latency / passes / cost as typed objects),
`space` (the only place that knows Optuna parameter names), `seeds`, `drift_model` (per-block
drift calibrated on one batch, the `model` seed), `evaluate` (one trial -> one TrialResult),
`fresh` (the verification noise as a check with records in the study), `refine` (per-block
tolerance bisection that closes a search), `verify` (fresh-noise re-check, interleaved
re-timing), `export`, `studies`
(Optuna storage, heartbeats, trial cap, once-only export), `summary` (typed, versioned) and
`run` (the whole tune, end to end).

May import tuner.measure, tuner.quality, tuner.bundled and tarflow; never tuner.report or tuner.cli.
"""
