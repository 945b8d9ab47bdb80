"""One self-contained HTML report of a tuning study: opens with no network at all.

`write_report(study_dir, out_html)` reads what `tune` wrote into a study folder (summary.json,
schedule.json, trials.csv, study.db, profile/, pictures/) and writes one HTML file with plotly.js
inlined once and every image embedded as a PNG data URI. It only renders files: it never loads
or runs the model (the pictures were sampled by `tune`).

Modules: `study` reads the folder into typed objects, `figures` (profile) and `search_figures`
(trials) draw with plotly, `tables` and `sections` write the HTML. Sections: summary, profile, search, schedules compared, samples, how
to use. A section whose input is missing shows a note instead.

May import tuner.search (space, summary, objectives: trials are decoded through the search
space, units come from the objective), tuner.measure, tuner.quality, tuner.bundled and tarflow;
never tuner.cli.
"""

from __future__ import annotations

from pathlib import Path

from tarflow.checkpoint import atomic_write_text

from .sections import build_html
from .study import StudyFolder, display_path, read_study

CSS = """
:root { --fg:#1d2330; --dim:#5f6b7a; --line:#dde2e8; --bg:#f6f8fa; --ok:#1b9e5a; --bad:#d1495b; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); background:#fff; }
main { max-width: 1320px; margin: 0 auto; padding: 18px 28px 60px; }
h1 { font-size: 24px; margin: 6px 0 2px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
nav { font-size: 13px; color: var(--dim); margin-bottom: 12px; }
nav a { color: #2b5ea7; margin-right: 14px; text-decoration: none; }
.sub { color: var(--dim); margin: 0 0 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--bg); }
.card .k { color: var(--dim); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin: 2px 0; }
.card .d { color: var(--dim); font-size: 12.5px; }
.kv { border-collapse: collapse; margin-top: 12px; font-size: 13px; }
.kv td { padding: 3px 12px 3px 0; vertical-align: top; }
.kv td:first-child { color: var(--dim); white-space: nowrap; }
table.compare { border-collapse: collapse; width: 100%; margin: 10px 0 18px; font-size: 13px; }
table.compare caption { caption-side: bottom; text-align: left; color: var(--dim); font-size: 12.5px;
                        padding-top: 6px; }
table.compare th, table.compare td { border: 1px solid var(--line); padding: 5px 8px; text-align: left;
                                     vertical-align: top; }
table.compare th { background: var(--bg); font-weight: 600; }
table.compare tr.chosen td { background: #fff8e1; }
table.compare td.chosen { background: #fff8e1; }
.dim { color: var(--dim); font-size: 12px; }
.note { border-left: 4px solid #8d939a; background: var(--bg); padding: 8px 12px; margin: 10px 0;
        color: var(--fg); }
.warn { border-left: 4px solid #e0a100; background: #fff8e1; padding: 8px 12px; margin: 10px 0; }
.alert { border: 2px solid var(--bad); background: #fdecee; padding: 12px 16px; margin: 14px 0;
         font-size: 16px; font-weight: 600; border-radius: 6px; }
.plot { border: 1px solid var(--line); border-radius: 8px; margin: 12px 0; padding: 4px; }
.row2 { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.row2 > .plot, .row2 > .tablebox { margin: 0; min-width: 0; }
.tablebox h3 { margin-top: 4px; }
@media (max-width: 1000px) { .row2 { grid-template-columns: 1fr; } }
.pics { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; flex: 1 1 360px; max-width: 440px; }
figure img { width: 100%; height: auto; image-rendering: pixelated; border: 1px solid var(--line); }
figcaption { font-size: 12.5px; color: var(--dim); margin-top: 4px; }
figcaption b { color: var(--fg); }
pre { background: #1f2430; color: #e8eaf0; padding: 12px 14px; border-radius: 6px; overflow-x: auto;
      font-size: 13px; line-height: 1.45; }
code { font-family: "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; }
footer { margin-top: 40px; color: var(--dim); font-size: 12px; }
"""


def write_report(study_dir: Path, out_html: Path) -> Path:
    """Write the HTML report of `study_dir` to `out_html` (atomically); returns the path.
    Raises UserError for a folder that is not a study."""
    import plotly.offline

    st = read_study(study_dir)
    page = build_html(st, checkpoint_shown=display_path(st.summary.checkpoint or "model"),
                      plotly_js=plotly.offline.get_plotlyjs(), css=CSS, version=_tool_version())
    atomic_write_text(Path(out_html), page)
    return Path(out_html)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tarflow-tuner")
    except PackageNotFoundError:
        return ""


__all__ = ["write_report", "read_study", "StudyFolder"]
