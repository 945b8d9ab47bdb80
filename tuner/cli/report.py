"""`report`: render a study folder as one offline HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tuner.cli.app import app
from tuner.cli.options import (ensure_writable, user_errors)


@app.command()
@user_errors
def report(
    study_dir: Path = typer.Argument(..., help="study folder written by `tune`"),
    out: Optional[Path] = typer.Option(None, help="HTML file (default: STUDY_DIR/report.html)"),
):
    """One self-contained HTML report of a study (opens offline): profile, search, schedules, samples."""
    from tuner.report import write_report

    path = out or study_dir / "report.html"
    ensure_writable(path)
    typer.echo(f"wrote {write_report(study_dir, path)}")
