"""tarflow-tuner: profile, search, export, sample and report GS-Jacobi schedules for TarFlow.

Packages by stage; each imports only packages below it (tests/test_layout.py checks this):

    cli      the one command line (parse, call, format)
    report   renders a study folder; never loads a model
    search   config, objectives, search space, seeds, trial evaluation, verification, export,
             Optuna study plumbing, the typed summary
    measure  profile, device profile, bench, timing, scale, pictures
    quality  FID extractors (and training the small one), FID maths, noise floor, distributed
             sampling, paired drift
    bundled  where the shipped files live (imports nothing from tuner)

All of them may import `tarflow`, the library, which never imports `tuner`.
"""
