"""The objective is a type: every table, card, axis and closing line shows an objective value in
the objective's own unit, and the summary says what each stored number is.

The issue this guards: the report of a passes study printed pass counts as milliseconds
(192000.0 "ms" for sequential). The committed studies are one of each objective:
studies/mnist/tune (latency), studies/mnist/tune_passes (passes) and
studies/mnist_p2/tune_b1_cost (cost:DEVICE.json). Expected numbers come from the study files
themselves or from the model's shape (sequential passes = blocks x (T - 1)).
"""

import html
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tarflow.errors import UserError
from tuner.cli.verdict import tune_lines
from tuner.report import read_study, write_report
from tuner.report.search_figures import history_fig, parallel_fig, scatter_fig
from tuner.search.objectives import Cost, Objective, Passes, from_record, objective_of, parse_objective
from tuner.search.summary import SUMMARY_VERSION, StudySummary

from .conftest import ROOT

STUDIES = {"latency": "mnist/tune", "passes": "mnist/tune_passes", "cost": "mnist_p2/tune_b1_cost"}


@pytest.fixture(scope="module", params=sorted(STUDIES))
def rendered(request, tmp_path_factory):
    """(kind, study folder, its report page) for one committed study of each objective."""
    d = tmp_path_factory.mktemp(request.param) / "study"
    shutil.copytree(ROOT / "studies" / STUDIES[request.param], d, ignore=shutil.ignore_patterns("report.html"))
    return request.param, d, write_report(d, d / "report.html").read_text()


def _text(cell: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()


def tables(page: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table of the page as (header cells, body rows), text only."""
    out = []
    for t in re.findall(r"<table\b.*?</table>", page, re.S):
        head = [_text(c) for c in re.findall(r"<th>(.*?)</th>", t, re.S)]
        body = re.search(r"<tbody>(.*?)</tbody>", t, re.S)
        rows = [[_text(c) for c in re.findall(r"<td>(.*?)</td>", r, re.S)]
                for r in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1) if body else "", re.S)]
        out.append((head, rows))
    return out


def cards(page: str) -> dict[str, tuple[str, str]]:
    found = re.findall(r'<div class="card"><div class="k">(.*?)</div><div class="v">(.*?)</div>'
                       r'<div class="d">(.*?)</div>', page, re.S)
    return {_text(k): (_text(v), _text(d)) for k, v, d in found}


def comparison(page: str):
    """The schedules-compared table: (header, rows by schedule name)."""
    head, rows = next((h, r) for h, r in tables(page) if h[:3] == ["schedule", "trial", "status"])
    return head, {r[0]: dict(zip(head, r)) for r in rows}


def test_parse_describe_and_rebuild():
    for goal in (parse_objective("latency"), parse_objective("passes"),
                 objective_of({"objective": "cost:devs/gpu.json"}, "NVIDIA H200")):
        assert from_record(json.loads(json.dumps(goal.describe("here")))) == goal
    assert type(objective_of({})) is Objective  # studies from before objectives were recorded
    p, c = Passes(), objective_of({"objective": "cost:devs/gpu.json"}, "NVIDIA H200")
    assert p.format(192.0) == "192 passes" and p.format(36.9375) == "36.9 passes"
    assert Objective().format(0.1234) == "123.4 ms" and c.format(0.05) == "50.0 ms"
    assert isinstance(c, Cost) and c.device_name("cpu") == "NVIDIA H200" and "NVIDIA H200" in c.title(16)
    assert p.device_name("cpu") is None and Objective().device_name("cpu") == "cpu"
    with pytest.raises(UserError, match="objective must be one of") as e:
        parse_objective("speed")
    assert e.value.setting == "objective"


def test_every_table_card_and_axis_uses_the_objective_unit(rendered):
    kind, d, page = rendered
    st = read_study(d)
    goal, s, b = st.goal, st.summary, st.summary.batch
    assert goal.kind == kind
    head, rows = comparison(page)
    column = goal.title(b)
    assert column in head and goal.short_unit in column
    ms_columns = [h for h in head if re.search(r"\bms\b", h)]
    assert ms_columns and all("latency" in h for h in ms_columns), ms_columns  # ms only ever for a time
    if kind == "passes":
        arch = s.model["arch"]
        seq = arch["num_blocks"] * ((arch["img_size"] // arch["patch_size"]) ** 2 - 1)
        assert rows["sequential (exact reference)"][column] == f"{seq}"  # 192, not 192000.0
        chosen = next(v for k, v in rows.items() if k.startswith("chosen"))
        assert chosen[column] == f"{st.schedule.provenance['passes_per_batch']:.1f}"
        assert not any("ms" in h for h in head if "passes" in h)
    else:
        seq = s.seeds["sequential"].objective_value
        assert rows["sequential (exact reference)"][column] == f"{seq * 1e3:.1f}"
    if kind == "cost":
        dev = json.loads((ROOT / "studies/mnist_p2/devices/cpu_1thread_b1.json").read_text())["device"]
        assert f"modelled latency on {dev['device_name']} (ms / batch of {b})" == column
    if kind == "latency":
        assert column == f"latency (ms / batch of {b})"
        assert rows["sequential (exact reference)"][column] == f"{s.seeds['sequential'].latency_s * 1e3:.1f}"
    top = next(h for h, _ in tables(page) if h[:2] == ["trial", "seed"])
    assert goal.title() in top
    card = cards(page)
    if kind != "latency":  # the objective leads; a latency study's leading card is the re-timed latency
        value, detail = card[column]
        assert value == goal.format(s.chosen_value) and value.endswith(goal.short_unit)
        assert f"vs {goal.format(s.sequential_value)} sequential" in detail


def test_figures_draw_the_objective_in_its_unit(rendered):
    kind, d, _ = rendered
    st = read_study(d)
    goal, s, b = st.goal, st.summary, st.summary.batch
    hist = history_fig(st, s.chosen_trial)
    assert hist.layout.yaxis.title.text == goal.title(b)
    seq_line = next(t for t in hist.data if (t.name or "").startswith("sequential"))
    assert seq_line.y[0] == pytest.approx(goal.display(s.sequential_value))
    assert (kind == "passes") == (seq_line.y[0] == s.sequential_passes)  # a count, not count x 1000
    chosen = next(t for t in hist.data if t.name == "chosen (verified)")
    assert chosen.y[0] == pytest.approx(goal.display(s.chosen_value))
    scatter = scatter_fig(st, s.chosen_trial)
    assert scatter.layout.xaxis.title.text == goal.title(b)
    bar = parallel_fig(st).data[0].line.colorbar.title.text
    assert goal.label in bar and goal.short_unit in bar
    if kind == "passes":
        for text in (hist.layout.yaxis.title.text, scatter.layout.xaxis.title.text, bar):
            assert "ms" not in text.replace("<br>", " ").split()


def test_parallel_coordinates_decode_plans_through_the_search_space():
    """Frontier windows and Anderson histories appear as what they are (the old figure read
    segment counts and budgets by parameter name and dropped the rest)."""
    st = read_study(ROOT / "studies" / "mnist" / "tune_passes")
    labels = {dim.label: dim for dim in parallel_fig(st).data[0].dimensions}
    solvers = {t for k in range(st.B) for t in labels[f"b{k} solver"].ticktext}
    assert any(t.startswith("frontier W=") for t in solvers) and "token by token" in solvers
    trials = pd.read_csv(ROOT / "studies" / "mnist" / "tune_passes" / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    if (done.filter(like="_anderson").fillna(0) > 0).any().any():
        assert any(name.endswith("Anderson") for name in labels)


def test_committed_summaries_say_what_they_hold():
    """Version 2 everywhere; `latency_s` fields are the measured medians trials.csv recorded;
    `objective_value` is the trial value; the summary round-trips."""
    for path in sorted((ROOT / "studies").rglob("summary.json")):
        assert json.loads(path.read_text())["version"] == SUMMARY_VERSION, path
        s = StudySummary.load(path)
        assert StudySummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        trials = pd.read_csv(path.parent / "trials.csv").set_index("number")
        value = trials["objective"] if "objective" in trials else trials["latency_s"]
        for name, seed in s.seeds.items():
            assert seed.latency_s == pytest.approx(trials.latency_s[seed.trial]), (path, name)
            assert seed.objective_value == pytest.approx(value[seed.trial]), (path, name)
        if s.chosen_trial is not None:
            assert s.chosen_latency_s == pytest.approx(trials.latency_s[s.chosen_trial])
            assert s.chosen_value == pytest.approx(value[s.chosen_trial])
        if s.goal.kind == "passes":
            assert s.sequential_value == s.sequential_passes


def _as_version_1(doc: dict) -> dict:
    """A version-2 summary written back as version 1 stored it: the trial value as `latency_s`."""
    old = json.loads(json.dumps(doc))
    for seed in old["seeds"].values():
        seed["latency_s"] = seed.pop("objective_value")
    for key in ("objective", "chosen_value", "chosen_latency_s"):
        old.pop(key)
    old["sequential"].pop("objective_value")
    return old | {"version": 1}


def test_a_version_1_summary_is_migrated_on_load(tmp_path):
    """Old study folders (and results stored in old study databases) still load: the values
    become objective values; a measured latency version 1 never recorded stays unknown."""
    for kind, study in STUDIES.items():
        doc = json.loads((ROOT / "studies" / study / "summary.json").read_text())
        new = StudySummary.from_dict(doc)
        old = StudySummary.from_dict(_as_version_1(doc))
        assert old.version == SUMMARY_VERSION and old.goal == new.goal and old.chosen_value == new.chosen_value
        for name, seed in old.seeds.items():
            assert seed.objective_value == new.seeds[name].objective_value
            assert seed.latency_s == (new.seeds[name].latency_s if kind == "latency" else None)
    d = tmp_path / "old"  # an old passes study folder still renders in passes
    shutil.copytree(ROOT / "studies" / STUDIES["passes"], d, ignore=shutil.ignore_patterns("report.html"))
    (d / "summary.json").write_text(json.dumps(_as_version_1(json.loads((d / "summary.json").read_text()))))
    head, rows = comparison(write_report(d, tmp_path / "r.html").read_text())
    assert rows["sequential (exact reference)"]["serial transformer passes per batch of 16"] == "192"
    with pytest.raises(UserError, match="unknown summary version 0"):
        StudySummary.from_dict(doc | {"version": 0})


def test_tune_lines_speak_in_the_objective():
    summaries = {k: StudySummary.load(ROOT / "studies" / s / "summary.json") for k, s in STUDIES.items()}
    lines = {k: "\n".join(tune_lines(s, Path("out"))) for k, s in summaries.items()}
    s = summaries["passes"]
    assert (f"{Passes().number(s.chosen_value)} serial transformer passes per batch of {s.batch} vs "
            f"{s.sequential_passes} sequential ({s.sequential_passes / s.chosen_value:.1f}x fewer") in lines["passes"]
    assert "It does not hold on this device" in lines["passes"] and " ms per batch" in lines["passes"]
    dev = json.loads((ROOT / "studies/mnist_p2/devices/cpu_1thread_b1.json").read_text())["device"]["device_name"]
    assert f"modelled on {dev}" in lines["cost"] and "device profile cpu_1thread_b1.json" in lines["cost"]
    assert "what it means" not in lines["latency"] and "x sequential (re-timed here" in lines["latency"]


def test_a_fresh_tune_records_objective_values_and_measured_latencies_apart(tiny_study):
    """What `tune` writes now: the objective record, trial values as objective values, measured
    medians as latencies (the tiny study's CPU default objective is passes)."""
    from tarflow.schedule import Schedule

    out, _ = tiny_study
    s = StudySummary.load(out / "summary.json")
    assert json.loads((out / "summary.json").read_text())["version"] == SUMMARY_VERSION
    assert s.objective == s.goal.describe(s.device["device_name"]) and s.goal.kind == "passes"
    trials = pd.read_csv(out / "trials.csv").set_index("number")
    for seed in s.seeds.values():
        assert seed.objective_value == trials.objective[seed.trial] and seed.latency_s == trials.latency_s[seed.trial]
    assert s.sequential_value == s.sequential.objective_value == s.sequential_passes
    p = Schedule.load(out / "schedule.json").provenance
    assert p["objective_value"] == s.chosen_value and p["objective_unit"] == s.goal.unit
    assert p["search_latency_s"] == s.chosen_latency_s == trials.latency_s[s.chosen_trial]
    assert "latency_search_s" not in p
