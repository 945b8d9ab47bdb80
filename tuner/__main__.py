"""`python -m tuner` runs the command line; `fid --workers` starts its torchrun processes this way,
with their arguments in TARFLOW_TUNER_ARGS."""

import json
import os

from tuner.cli import app

args = os.environ.get("TARFLOW_TUNER_ARGS")
app(args=None if args is None else json.loads(args))
