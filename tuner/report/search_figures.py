"""The report's figures of the search: objective history, objective vs FID gap, parameter
importances, parallel coordinates of the trials' schedules.

Every objective value is drawn by the study's objective (tuner.search.objectives: its unit,
label and scale), so a pass count is never drawn as milliseconds; every trial's schedule is
decoded by the search space (tuner.search.space), so these figures know no parameter names and
show what a plan is (segments, frontier window, Anderson, budget). `*_fig` return plotly figures
(tests read their axes); `*_figure` return the HTML fragments the page embeds.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

from tuner.search.space import SearchSpace

from .html import PALETTE, STATE_COLORS, _seed_name, completed, esc, fid_tag, fig_html, ms, note, num, trial_state
from .study import StudyFolder
from .tables import pruned_reason

MARKERS = (("feasible", "circle"), ("infeasible", "circle-open"), ("pruned", "x"), ("failed", "x"))


def _hover(st: StudyFolder, r: dict) -> str:
    """A trial as the hover text shows it: its objective value, the measured latency apart."""
    goal = st.goal
    s = f"trial {r['number']}" + (f" (seed: {_seed_name(r)})" if _seed_name(r) else "")
    kind = trial_state(r)
    if kind == "pruned":
        return s + f"<br>pruned: {esc(pruned_reason(r))}"
    if kind == "failed":
        return s + "<br>failed"
    s += f"<br>{goal.label}: {goal.format(r.get('objective'))}"
    if not goal.measured:
        s += f"<br>latency in the search {ms(r.get('latency_s'))} ms"
    return s + f"<br>FID gap {num(r.get('fid_gap'), '+.3g')}"


def _shown(st: StudyFolder, values) -> np.ndarray:
    """Stored objective values as displayed (ms, passes)."""
    return np.asarray(values, dtype=float) * st.goal.scale


def history_fig(st: StudyFolder, chosen: int | None):
    """Each trial's objective value (what the search minimised) in trial order."""
    import plotly.graph_objects as go

    goal, b = st.goal, st.summary.batch
    df = st.trials.copy()
    df["kind"] = [trial_state(r) for r in df.to_dict("records")]
    fig = go.Figure()
    for kind, sym in MARKERS:
        d = df[df.kind == kind]
        if d.empty:
            continue
        y = _shown(st, d.objective) if kind in ("feasible", "infeasible") else np.zeros(len(d))
        label = {"pruned": "stopped early (reason on hover; no value, drawn at 0)",
                 "failed": "failed (drawn at 0)"}.get(kind, kind)
        fig.add_trace(go.Scatter(x=d.number, y=y, mode="markers", name=label,
                                 text=[_hover(st, r) for r in d.to_dict("records")],
                                 hovertemplate="%{text}<extra></extra>",
                                 marker=dict(color=STATE_COLORS[kind], symbol=sym, size=9,
                                             line=dict(width=1.5, color=STATE_COLORS[kind]))))
    feas = df[df.kind == "feasible"].sort_values("number")
    if not feas.empty:
        best = np.minimum.accumulate(_shown(st, feas.objective))
        fig.add_trace(go.Scatter(x=list(feas.number) + [int(df.number.max())], y=list(best) + [float(best[-1])],
                                 mode="lines", line=dict(color=STATE_COLORS["feasible"], shape="hv"),
                                 name="best feasible so far", hoverinfo="skip"))
    _add_chosen(fig, df, chosen, lambda r: _shown(st, [r.objective])[0])
    seq = st.summary.sequential_value
    if seq is not None:
        fig.add_trace(go.Scatter(x=[int(df.number.min()), int(df.number.max())], y=[goal.display(seq)] * 2,
                                 mode="lines", line=dict(dash="dash", color="#555"),
                                 name=f"sequential ({goal.format(seq)})", hoverinfo="skip"))
    fig.update_layout(title=dict(text=f"Optimisation history — objective: {goal.title(b)}",
                                 font=dict(size=14)),
                      xaxis_title="trial number", yaxis_title=goal.title(b), legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(rangemode="tozero")
    return fig


def _add_chosen(fig, df, chosen: int | None, y_of, x_of=lambda r: r.number) -> None:
    import plotly.graph_objects as go

    if chosen is not None and (df.number == chosen).any():
        r = df[df.number == chosen].iloc[0]
        fig.add_trace(go.Scatter(x=[x_of(r)], y=[y_of(r)], mode="markers", name="chosen (verified)",
                                 marker=dict(symbol="star", size=18, color="#f2b705",
                                             line=dict(color="black", width=1))))


def history_figure(st: StudyFolder, chosen: int | None) -> str:
    return fig_html(history_fig(st, chosen), 430)


def scatter_fig(st: StudyFolder, chosen: int | None):
    """Each completed trial's objective value against its FID gap, with the tolerance and the
    noise floor."""
    import plotly.graph_objects as go

    goal, b = st.goal, st.summary.batch
    ext, n = st.search_fid
    tol, floor = st.summary.tolerance, st.summary.noise_floor
    std = floor.get("std")
    df = completed(st.trials)
    df["kind"] = [trial_state(r) for r in df.to_dict("records")]
    fig = go.Figure()
    if std is not None and math.isfinite(std):
        res = floor.get("resolution") or 2 * math.sqrt(2) * std
        fig.add_hrect(y0=-std, y1=std, fillcolor="#9aa0a6", opacity=0.22, line_width=0)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=(
            f"noise floor: ±1 std = ±{std:.3g} ({len(floor.get('values', []))} seeds, "
            f"n={floor.get('n', n)}); resolution 2√2·std = {res:.3g}"),
            marker=dict(symbol="square", size=12, color="rgba(154,160,166,0.45)")))
    fig.add_hline(y=tol, line=dict(color="#d1495b", dash="dash", width=2))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"tolerance: FID gap ≤ +{tol:g}",
                             line=dict(color="#d1495b", dash="dash", width=2)))
    for kind in ("feasible", "infeasible"):
        d = df[df.kind == kind]
        if d.empty:
            continue
        fig.add_trace(go.Scatter(x=_shown(st, d.objective), y=d.fid_gap, mode="markers+text", name=kind,
                                 text=[_seed_name(r) for r in d.to_dict("records")], textposition="top center",
                                 hovertext=[_hover(st, r) for r in d.to_dict("records")],
                                 hovertemplate="%{hovertext}<extra></extra>",
                                 marker=dict(color=STATE_COLORS[kind], size=10,
                                             symbol="circle" if kind == "feasible" else "circle-open",
                                             line=dict(width=1.5, color=STATE_COLORS[kind]))))
    _add_chosen(fig, df, chosen, lambda r: r.fid_gap, lambda r: _shown(st, [r.objective])[0])
    label = goal.label[:1].upper() + goal.label[1:]
    fig.update_layout(title=dict(text=f"{label} vs FID gap to sequential (same noise; {fid_tag(ext, n)})",
                                 font=dict(size=14)),
                      xaxis_title=goal.title(b), yaxis_title=f"FID gap ({fid_tag(ext, n)})",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def scatter_figure(st: StudyFolder, chosen: int | None) -> str:
    return fig_html(scatter_fig(st, chosen), 460)


def importance_figure(st: StudyFolder) -> str:
    """Parameter importances (PED-ANOVA) for the objective and for the FID gap (the labels are
    Optuna's parameter names, shown as stored)."""
    import optuna
    import plotly.graph_objects as go

    db = st.path / "study.db"
    if not db.is_file():
        return note("Parameter importances: no study.db in the study folder (the search used another "
                    "Optuna storage).")
    name = st.summary.study
    storage = None
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve().as_posix()}")
        study = optuna.load_study(study_name=name, storage=storage)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) < 2:
            return note(f"Parameter importances need at least 2 completed trials ({len(done)} completed).")
        # PED-ANOVA needs no scikit-learn (fANOVA does); fall back to Optuna's default
        ev_cls = getattr(optuna.importance, "PedAnovaImportanceEvaluator", None)
        evaluator = ev_cls() if ev_cls is not None else None
        ev_name = "PED-ANOVA" if ev_cls is not None else "Optuna's default evaluator"
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for label, target in ((st.goal.label, None),
                                  ("FID gap", lambda t: t.user_attrs.get("fid_gap", float("nan")))):
                try:
                    out[label] = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                                         target=target)
                except Exception as e:  # noqa: BLE001 - any evaluator failure becomes a note
                    out[label] = e
    except Exception as e:  # noqa: BLE001
        return note(f"Parameter importances could not be computed: {esc(e)}")
    finally:
        if storage is not None:
            try:
                storage.remove_session()
                storage.engine.dispose()
            except Exception:  # noqa: BLE001
                pass
    ok = {k: v for k, v in out.items() if isinstance(v, dict) and v}
    if not ok:
        errs = "; ".join(f"{k}: {esc(v)}" for k, v in out.items())
        return note(f"Parameter importances could not be computed ({errs}).")
    first = next(iter(ok.values()))
    params = sorted({p for v in ok.values() for p, w in v.items() if w > 0},
                    key=lambda p: (first.get(p, 0.0), max(v.get(p, 0) for v in ok.values())))
    params = params[-16:]
    fig = go.Figure()
    for i, (label, imp) in enumerate(ok.items()):
        fig.add_trace(go.Bar(y=params, x=[imp.get(p, 0.0) for p in params], orientation="h",
                             name=f"for {label}", marker_color=PALETTE[i * 3]))
    failed = [f"{k}: {esc(v)}" for k, v in out.items() if not isinstance(v, dict)]
    fig.update_layout(barmode="group", xaxis_title="importance (normalised, sums to 1 per target)",
                      title=dict(text=f"Parameter importances ({ev_name}, {len(done)} completed trials)",
                                 font=dict(size=14)), legend=dict(orientation="h", y=-0.15))
    extra = note("Not computed for " + "; ".join(failed)) if failed else ""
    return fig_html(fig, max(320, 26 * len(params) * len(ok) // 2 + 160)) + extra


def _solver(p: dict | None, T: int):
    """A block plan's solver as one category: S segments, a frontier window, or token by token."""
    if p is None:
        return np.nan
    if p.get("mode") == "frontier":
        return f"frontier W={p['window']}"
    return "token by token" if p["segments"] >= T else f"S={p['segments']}"


def _category_order(c) -> tuple:
    """Segments by count, then frontier windows by size, then token by token; numbers as numbers."""
    text = str(c)
    digits = re.findall(r"[\d.]+(?:e-?\d+)?", text)
    number = float(digits[0]) if digits else 0.0
    return (text.startswith("frontier"), text == "token by token", number, text)


def _categorical(dims: list, label: str, values) -> None:
    vals = list(values)
    cats = sorted({v for v in vals if not _isnan(v)}, key=_category_order)
    if not cats:
        return
    code = {c: i for i, c in enumerate(cats)}
    dims.append(dict(label=label, values=[code.get(v, np.nan) for v in vals], tickvals=list(range(len(cats))),
                     ticktext=[_fmt_cat(c) for c in cats], range=[-0.3, len(cats) - 0.7]))


def _numeric(dims: list, label: str, values) -> None:
    vals = np.asarray(values, dtype=float)
    fin = vals[np.isfinite(vals)]
    if fin.size == 0:
        return
    lo, hi = float(fin.min()), float(fin.max())
    pad = 0.5 if hi == lo else 0.0
    dims.append(dict(label=label, values=vals, range=[lo - pad, hi + pad]))


def plan_dimensions(st: StudyFolder, records: list[dict]) -> list[dict]:
    """The trials' schedules decoded by the search space, as parallel-coordinate axes: per block
    in sampling order its solver, initial guess, tolerance (log10; exact at the axis' bottom,
    none for a token-by-token block), pass budget (segments) and Anderson history (where any
    trial used it). Studies from before per-block tolerances show their shared one on every block."""
    T, dims = st.T, []
    plans = [{int(p["block"]): p for p in st.space.plans_from_row(r) or []} for r in records]
    for k in range(st.B - 1, -1, -1):
        ps = [m.get(k) for m in plans]
        _categorical(dims, f"b{k} solver", [_solver(p, T) for p in ps])
        _categorical(dims, f"b{k} init", [p["init"] if p else np.nan for p in ps])
        tolerant = [p if p and (p.get("mode") == "frontier" or p["segments"] < T) else None for p in ps]
        _numeric(dims, f"b{k} log10 tol", [np.nan if p is None else SearchSpace.log_tol(p["tol"]) for p in tolerant])
        segmented = [p if p and p.get("mode") != "frontier" and p["segments"] < T else None for p in ps]
        _numeric(dims, f"b{k} budget", [p["max_iters"] if p else np.nan for p in segmented])
        if any(p and p.get("anderson") for p in segmented):
            _categorical(dims, f"b{k} Anderson", [p.get("anderson", 0) if p else np.nan for p in segmented])
    return dims


def parallel_fig(st: StudyFolder):
    """Completed trials' decoded schedules and FID gap as parallel coordinates, coloured by the
    objective (None with fewer than two completed trials)."""
    import plotly.graph_objects as go

    goal = st.goal
    df = completed(st.trials)
    if len(df) < 2:
        return None
    dims = plan_dimensions(st, df.to_dict("records"))
    ext, n = st.search_fid
    _numeric(dims, "FID gap", df.fid_gap)
    fig = go.Figure(go.Parcoords(
        line=dict(color=_shown(st, df.objective), colorscale="Viridis", showscale=True,
                  colorbar=dict(title=dict(text=f"{goal.label}<br>{goal.short_unit} / batch"))),
        dimensions=dims, labelangle=-25, labelside="top"))
    fig.update_layout(title=dict(text=f"Parallel coordinates over the {len(df)} completed trials "
                                      f"(blocks in sampling order; FID gap: {fid_tag(ext, n)}; "
                                      f"colour = {goal.label})", font=dict(size=14), y=0.97))
    return fig


def parallel_figure(st: StudyFolder) -> str:
    fig = parallel_fig(st)
    if fig is None:
        return note(f"Parallel coordinates need at least 2 completed trials ({len(completed(st.trials))} completed).")
    return fig_html(fig, 480, top=130)


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt_cat(v) -> str:
    try:
        f = float(v)
        return f"{f:g}"
    except (TypeError, ValueError):
        return str(v)
