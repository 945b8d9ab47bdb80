"""The one `tarflow-tuner` Typer app; every command module registers itself on it."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tune, run and report GS-Jacobi sampling schedules for TarFlow models.")
schedule_app = typer.Typer(help="Inspect schedules.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


@app.callback()
def _root():
    """Tune, run and report GS-Jacobi sampling schedules for TarFlow models."""
