"""The HTML report: self-contained, every section and plot present, one-line errors, renders.

A tiny but real study is built once per module with the same library calls `tune` makes (a
small profile and a 5-trial search on the bundled model); a second copy has its schedule
removed, as when nothing met the tolerance.
"""

import json
import re
import shutil
import subprocess
import tempfile

import pytest
from typer.testing import CliRunner

from tarflow.errors import UserError
from tuner.cli import app
from tuner.report import write_report

from .conftest import ROOT

SECTIONS = ("Summary", "Profile", "Search", "Schedules compared", "Samples", "How to use this schedule")
runner = CliRunner()


COMMITTED = ROOT / "studies" / "mnist" / "tune"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The committed bundled study, copied (rendering it must not need the model)."""
    d = tmp_path_factory.mktemp("study") / "tune"
    shutil.copytree(COMMITTED, d, ignore=shutil.ignore_patterns("report.html"))
    return d


@pytest.fixture(scope="module")
def report(study):
    path = write_report(study, study / "report.html")
    return path, path.read_text()


@pytest.fixture(scope="module")
def no_schedule_study(study, tmp_path_factory):
    d = tmp_path_factory.mktemp("nosched") / "study"
    shutil.copytree(study, d, ignore=shutil.ignore_patterns("report.html"))
    (d / "schedule.json").unlink()
    s = json.loads((d / "summary.json").read_text())
    s["schedule"], s["chosen_trial"], s["chosen_iters"], s["final_latency"] = None, None, None, {}
    (d / "summary.json").write_text(json.dumps(s))
    info = json.loads((d / "pictures" / "pictures.json").read_text())
    info["schedule"] = None
    (d / "pictures" / "pictures.json").write_text(json.dumps(info))
    return d


def outside_scripts(page: str) -> str:
    return re.sub(r"<script\b[^>]*>.*?</script>", "", page, flags=re.S | re.I)


def without_base64(page: str) -> str:
    """Embedded data: URIs removed (random base64 can spell anything, "cdn" included)."""
    return re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", page)


def test_report_is_self_contained(report, study):
    path, page = report
    assert path.is_file() and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert not re.search(r"<i?frame\b|<object\b|<embed\b", page, re.I)
    assert page.count("<script") >= 7  # plotly.js once, then one small call per figure
    assert "Plotly.newPlot" in page
    html = outside_scripts(page)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert not re.search(r"@import|url\(\s*[\"']?https?:", html, re.I)
    assert "cdn" not in without_base64(html).lower()
    for machine_path in (str(ROOT), str(study.resolve())):  # none in a report meant to be shared
        assert machine_path not in page


def test_report_never_touches_the_model(study, tmp_path, monkeypatch):
    import tarflow.checkpoint
    import tarflow.sampling

    def refuse(*a, **k):
        raise AssertionError("the report ran the model")

    monkeypatch.setattr(tarflow.checkpoint, "load_checkpoint", refuse)
    monkeypatch.setattr(tarflow.sampling, "sample", refuse)
    assert write_report(study, tmp_path / "r.html").stat().st_size > 100_000


def test_report_shows_the_study_as_recorded(report, study):
    """The chosen plan decoded through the search space, search and re-timed latencies apart."""
    from tarflow.schedule import Schedule
    from tuner.search.summary import StudySummary

    _, page = report
    summary = StudySummary.load(study / "summary.json")
    sched = Schedule.load(study / "schedule.json")
    seq = summary.seeds["sequential"]
    assert f"{seq.latency_s * 1e3:.1f}" in page and f"{seq.latency_final['median_s'] * 1e3:.1f}" in page
    assert f"{summary.final_latency['chosen']['median_s'] * 1e3:.1f}" in page
    assert f"{sched.provenance['speedup_vs_sequential']:.2f}×" in page
    first = sched.plans[0]  # sampled first; token by token when S = T
    assert ("token by token" if first.segments == 49 else f"S={first.segments} ×") in page
    paper = summary.seeds["paper"].schedule
    tough = next(p for p in paper if p["segments"] > 1)
    assert f"S={tough['segments']} × ≤{tough['max_iters']}, {tough['init']}" in page
    assert "labels balanced, no guidance, no denoising step, float32" in page  # the sampling settings


def test_report_has_sections_plots_and_pictures(report, study):
    _, page = report
    for title in SECTIONS:
        assert re.search(rf"<h2[^>]*>{re.escape(title)}</h2>", page), title
    assert page.count('class="plotly-graph-div"') >= 6
    assert outside_scripts(page).count('src="data:image/png;base64,') == 4  # grids, |Δ|, worst pair
    assert "Per-sample pixel drift" in page
    summary = json.loads((study / "summary.json").read_text())
    ext = summary["sequential"]["extractor"]
    assert f"{ext}, n={summary['sequential']['n']}" in page  # every FID names its extractor and n
    assert "forward block index; sampling runs block 3 first" in page
    assert "sampling order" in page
    assert "tarflow-tuner sample --checkpoint" in page
    assert "No schedule was exported" not in page
    for seed in ("sequential", "uniform Jacobi", "paper heuristic", "SeJD rule"):
        assert seed in page


def test_report_without_schedule_says_so(no_schedule_study, tmp_path):
    out = write_report(no_schedule_study, tmp_path / "r.html")
    page = out.read_text()
    assert "No schedule was exported" in page
    assert page.count('class="plotly-graph-div"') >= 6  # profile and search still shown
    assert outside_scripts(page).count('src="data:image/png;base64,') == 1  # sequential grid only


def test_report_cli_default_out_and_errors(study, tmp_path):
    res = runner.invoke(app, ["report", str(study), "--out", str(tmp_path / "cli.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli.html").stat().st_size > 100_000
    (tmp_path / "v2").mkdir()
    doc = json.loads((study / "summary.json").read_text())
    (tmp_path / "v2" / "summary.json").write_text(json.dumps(doc | {"version": 99}))
    for args, text in ((["report", str(tmp_path / "nowhere")], "not a tarflow-tuner study folder"),
                       (["report", str(tmp_path)], "not a tarflow-tuner study folder"),
                       (["report", str(tmp_path / "v2")], "unknown summary version 99")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert text in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["report", str(study), "--checkpoint", "m.pth"])
    assert res.exit_code == 2 and "No such option: --checkpoint" in res.output  # renders files only


def test_invalid_summary_is_a_user_error(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid study summary"):
        write_report(tmp_path, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    import numpy as np
    from PIL import Image

    path, _ = report
    png = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile_dir:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={profile_dir}", "--window-size=1400,3000",
                        "--virtual-time-budget=5000", f"--screenshot={png}", path.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 50_000
    img = np.asarray(Image.open(png).convert("RGB"))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # drawn plots, not a blank page
    # plots drawn: plotly's SVG renders coloured marks in the upper part of the page
    top = img[: img.shape[0] // 2]
    coloured = (top.max(axis=2).astype(int) - top.min(axis=2)) > 60
    assert coloured.mean() > 0.002


def test_a_passes_study_leads_with_its_objective_and_drift(tmp_path):
    """The committed main-job study (objective passes): its summary cards and history plot show
    the measure the search minimised, and the verified drift, read from its files."""
    src = ROOT / "studies" / "mnist" / "tune_passes"
    shutil.copytree(src, tmp_path / "s", ignore=shutil.ignore_patterns("report.html"))
    html = write_report(tmp_path / "s", tmp_path / "r.html").read_text()
    prov = json.loads((src / "schedule.json").read_text())["provenance"]
    assert "serial transformer passes per batch of 16" in html and f"{prov['passes_per_batch']:.3g}" in html
    assert "drift vs sequential, re-verified" in html and f"{prov['fid_verify']['proxy']['rmse_max']:.3g}/255 max" in html
    assert "objective: serial transformer passes per batch" in html


def test_the_profile_table_shows_every_guess_the_profile_scored(report, tmp_path):
    """The default tune's profile fitted the calibrated guess: its IGM and passes to 1e-3 are in
    the table and the IGM figure; a profile without it (the committed older study) has no such
    column."""
    import pandas as pd

    d = tmp_path / "tune_default"
    shutil.copytree(ROOT / "studies" / "mnist" / "tune_default", d, ignore=shutil.ignore_patterns("report.html"))
    page = write_report(d, d / "report.html").read_text()
    prof = pd.read_csv(d / "profile" / "profile.csv")
    assert "<th>IGM calibrated</th>" in page and "(zeros / z / calibrated)" in page
    for v in prof.igm_calibrated:
        assert f"<td>{v:.3g}</td>" in page
    assert "IGM, init=calibrated" in page
    assert "IGM calibrated" not in report[1] and "IGM z" in report[1]


def test_a_seed_stopped_early_shows_its_reason_once_escaped(tmp_path):
    """The default tune's paper seed was stopped as slow: its row in the comparison says why, with
    the '>' escaped once (not shown as '&gt;')."""
    d = tmp_path / "tune_default"
    shutil.copytree(ROOT / "studies" / "mnist" / "tune_default", d, ignore=shutil.ignore_patterns("report.html"))
    page = write_report(d, d / "report.html").read_text()
    assert "pruned: slow: 71 passes on the first batch &gt; 1.5 x the best feasible trial&#x27;s 31.3 passes" in page
    assert "&amp;gt;" not in page
