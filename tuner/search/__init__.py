"""The search: `config` (TuneConfig), `objectives` (latency / passes / cost as typed objects),
`space` (the only place that knows Optuna parameter names), `seeds`, `evaluate` (one trial ->
one TrialResult), `verify` (fresh-noise re-check, interleaved re-timing), `export`, `studies`
(Optuna storage, heartbeats, trial cap, once-only export), `summary` (typed, versioned) and
`run` (the whole tune, end to end).

May import tuner.measure, tuner.quality, tuner.bundled and tarflow; never tuner.report or tuner.cli.
"""
