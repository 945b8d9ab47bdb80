"""The command line: one Typer app (`tarflow-tuner`, also `python -m tuner`), one module per
command. Commands parse options, call the stage packages and format what they return; the
shared option groups live in `options`, tune's closing lines in `verdict`.

May import every other `tuner` package and `tarflow`; nothing imports it.
"""

import sys

from tuner.bundled import DEFAULT_CALIB, DEFAULT_CKPT
from tuner.cli.app import app
from tuner.cli import train, sample, fid, profile, tune, device, bench, report, scale  # noqa: F401  (register commands)

__all__ = ["app", "main", "DEFAULT_CKPT", "DEFAULT_CALIB"]


def main():  # pragma: no cover - console entry point
    sys.exit(app())
