"""Measurements of a model and a device: `profile` (CRM, IGM, convergence curves), `device_profile`
(one pass per width, for the cost objective), `bench` (samplers side by side), `timing`,
`scale` (GPU-study step costs) and `pictures` (the sample grids a study shows).

May import tuner.quality, tuner.bundled and tarflow; never tuner.search, tuner.report or tuner.cli.
"""
