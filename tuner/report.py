"""One self-contained HTML report of a tuning study: opens with no network at all.

`write_report(study_dir, out_html)` reads what `tune` wrote into a study folder (summary.json,
schedule.json, trials.csv, study.db, profile/), samples a picture grid from the sequential
sampler and from the chosen schedule on the same noise, and writes one HTML file with plotly.js
inlined once (every other figure reuses it) and every image embedded as a PNG data URI.

Sections: summary header, profile (per block, forward order), search (history, latency vs FID
gap, parameter importances, parallel coordinates), schedules compared (sampling order),
samples, and how to use the schedule. A section whose input is missing shows a note instead.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tarflow.checkpoint import atomic_write_text
from tarflow.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_ORDER = ("sequential", "jacobi", "paper", "sejd")
SEED_TITLES = {"sequential": "sequential (exact reference)", "jacobi": "uniform Jacobi",
               "paper": "paper heuristic (CRM/IGM)", "sejd": "SeJD rule"}
STATE_COLORS = {"feasible": "#1b9e5a", "infeasible": "#d1495b", "pruned": "#8d939a", "failed": "#3b3b3b"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "toImageButtonOptions": {"format": "png", "scale": 2}}


# --- reading the study folder ----------------------------------------------------------------

@dataclass
class StudyFolder:
    path: Path
    summary: dict
    trials: pd.DataFrame | None
    profile: object | None  # tuner.profile.Profile
    schedule: object | None  # tarflow.schedule.Schedule
    notes: list[str]

    @property
    def arch(self) -> dict:
        return (self.summary.get("model") or {}).get("arch") or {}

    @property
    def B(self) -> int:
        if self.arch.get("num_blocks"):
            return int(self.arch["num_blocks"])
        if self.profile is not None:
            return len(self.profile.blocks)
        return 0

    @property
    def T(self) -> int:
        a = self.arch
        if a.get("img_size") and a.get("patch_size"):
            return (int(a["img_size"]) // int(a["patch_size"])) ** 2
        return int(self.profile.meta.get("T", 0)) if self.profile is not None else 0

    @property
    def search_fid(self) -> tuple[str, int]:
        seq = self.summary.get("sequential") or {}
        cfg = self.summary.get("config") or {}
        return str(seq.get("extractor") or cfg.get("extractor", "?")), int(seq.get("n") or cfg.get("n", 0))


def read_study(study_dir) -> StudyFolder:
    """Everything `tune` wrote into `study_dir`; UserError when it is not a study folder."""
    from tarflow.schedule import Schedule

    d = Path(study_dir)
    sp = d / "summary.json"
    if not d.is_dir() or not sp.is_file():
        raise UserError(f"not a tarflow-tuner study folder: {d} (no summary.json)")
    try:
        summary = json.loads(sp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{sp}: not a valid study summary ({e})") from None
    missing = [k for k in ("tolerance", "sequential", "model") if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise UserError(f"{sp}: not a valid study summary (missing {', '.join(missing)})")
    notes = []
    trials = None
    if (d / "trials.csv").is_file():
        try:
            trials = pd.read_csv(d / "trials.csv")
        except Exception as e:  # pandas raises several types for bad CSV
            notes.append(f"trials.csv could not be read ({e})")
    else:
        notes.append("trials.csv is missing")
    profile = None
    if (d / "profile" / "profile.json").is_file():
        from .profile import Profile

        try:
            profile = Profile.load(d / "profile")
        except UserError as e:
            notes.append(str(e))
    else:
        notes.append("profile/profile.json is missing")
    schedule = None
    if (d / "schedule.json").is_file():
        schedule = Schedule.load(d / "schedule.json")
    elif summary.get("schedule"):
        schedule = Schedule.from_dict(summary["schedule"], f"{sp}: schedule")
    return StudyFolder(d, summary, trials, profile, schedule, notes)


def resolve_checkpoint(checkpoint, summary: dict) -> Path:
    """The given path, else summary["checkpoint"]; relative paths: current folder, then repo root."""
    given = checkpoint if checkpoint is not None else summary.get("checkpoint")
    if not given:
        raise UserError("the study records no checkpoint: pass --checkpoint")
    p = Path(given)
    for cand in ([p] if p.is_absolute() else [p, REPO_ROOT / p]):
        if cand.is_file():
            return cand
    hint = "" if checkpoint is not None else "; pass --checkpoint"
    raise UserError(f"checkpoint not found: {given}{hint}")


def display_path(p) -> str:
    """A path as a reader should see it: relative to the current folder or the repo when possible."""
    p = Path(p)
    if not p.is_absolute():
        return p.as_posix()
    for base in (Path.cwd(), REPO_ROOT):
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return p.name  # never leak a machine's absolute layout into a shared report


# --- small formatting helpers ----------------------------------------------------------------

def esc(x) -> str:
    return html.escape(str(x), quote=True)


def num(x, fmt: str = ".4g", none: str = "–") -> str:
    try:
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return none
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return none


def ms(seconds) -> str:
    return num(None if seconds is None else 1e3 * float(seconds), ".1f")


def fid_tag(extractor: str, n) -> str:
    return f"{extractor}, n={n}"


def table(header: list[str], rows: list[list[str]], caption: str = "", cls: str = "",
          row_cls: list[str] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    row_cls = row_cls or [""] * len(rows)
    body = "".join((f'<tr class="{rc}">' if rc else "<tr>") + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                   for r, rc in zip(rows, row_cls))
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def note(text: str, kind: str = "note") -> str:
    return f'<div class="{kind}">{text}</div>'


def fig_html(fig, height: int, top: int = 60) -> str:
    fig.update_layout(height=height, template="plotly_white", margin=dict(l=60, r=30, t=top, b=50),
                      font=dict(size=12))
    return fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                       default_width="100%", default_height=f"{height}px")


def trial_state(row) -> str:
    st = str(row.get("state", ""))
    if st == "COMPLETE":
        return "feasible" if _truthy(row.get("feasible")) else "infeasible"
    return "pruned" if st == "PRUNED" else "failed"


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1")
    try:
        return bool(v) and not (isinstance(v, float) and math.isnan(v))
    except (TypeError, ValueError):
        return False


def _seed_name(row) -> str:
    s = row.get("seed")
    return "" if s is None or (isinstance(s, float) and math.isnan(s)) else str(s)


# --- figures ---------------------------------------------------------------------------------

def profile_bars(st: StudyFolder) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    prof = st.profile.blocks.sort_values("block")
    B = len(prof)
    labels = [f"block {int(k)}<br>(step {int(s)})" for k, s in zip(prof.block, prof.sampling_step)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("CRM share of all blocks (%) — higher = harder to solve in parallel",
                                        "IGM per initial guess — lower = better starting point"))
    fig.add_trace(go.Bar(x=labels, y=prof.crm_share, name="CRM share (%)", marker_color="#4c72b0",
                         text=[f"{v:.1f}%" for v in prof.crm_share], textposition="outside",
                         hovertemplate="%{x}<br>CRM share %{y:.1f}%<extra></extra>"), 1, 1)
    for i, init in enumerate(("zeros", "z")):
        col = f"igm_{init}"
        if col in prof:
            fig.add_trace(go.Bar(x=labels, y=prof[col], name=f"IGM, init={init}",
                                 marker_color=PALETTE[1 + i],
                                 hovertemplate=f"%{{x}}<br>IGM init={init}: %{{y:.3g}}<extra></extra>"), 1, 2)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.25, x=0.55),
                      title=dict(text=f"Per-block difficulty on {st.profile.meta.get('n', '?')} calibration "
                                      f"images — forward block index; sampling runs block {B - 1} first (step 0)",
                                 font=dict(size=14)))
    fig.update_yaxes(title_text="CRM share (%)", row=1, col=1)
    fig.update_yaxes(title_text="IGM (spectral norm)", row=1, col=2)
    return fig_html(fig, 450, top=95)


def convergence_figure(st: StudyFolder) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    curves = st.profile.curves
    if curves is None or curves.empty:
        return note("No convergence curves in the profile.")
    T = st.T or int(curves.seg_len.max())
    blocks = sorted(int(b) for b in curves.block.unique())
    B = len(blocks)
    cols = min(B, 4)
    rows = -(-B // cols)
    titles = [f"block {k} (sampling step {B - 1 - k})" for k in blocks]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.14)
    seg_counts = sorted(int(s) for s in curves.segments.unique() if int(s) < T)
    colors = {S: PALETTE[i % len(PALETTE)] for i, S in enumerate(seg_counts)}
    shown = set()
    for i, k in enumerate(blocks):
        r, c = divmod(i, cols)
        cb = curves[(curves.block == k) & (curves.iteration > 0)]
        variants = [(S, init, dash, 0) for S in seg_counts for init, dash in (("zeros", "solid"), ("z", "dot"))]
        variants += [(1, init, "dashdot", m) for m in sorted(set(cb.anderson) - {0})
                     for init in sorted(set(cb[cb.anderson == m].init))]
        for S, init, dash, m in variants:
            cc = cb[(cb.segments == S) & (cb.init == init) & (cb.anderson == m)]
            if cc.empty:
                continue
            # error of the block after pass i: max over segments (a finished segment keeps its last error)
            piv = cc.pivot_table(index="iteration", columns="segment", values="error", aggfunc="max")
            err = piv.ffill().max(axis=1)
            err = err[err > 0]
            label = f"S={S}, init={init}" + (f", Anderson m={m}" if m else "")
            color = colors.get(S, PALETTE[0]) if not m else PALETTE[(len(seg_counts) + m) % len(PALETTE)]
            fig.add_trace(go.Scatter(
                x=err.index, y=err.values, mode="lines", line=dict(color=color, dash=dash, width=1.8),
                name=label, legendgroup=label, showlegend=label not in shown,
                hovertemplate=f"block {k}, {label}<br>pass %{{x}}: max error %{{y:.3g}}<extra></extra>"),
                r + 1, c + 1)
            shown.add(label)
    fig.update_yaxes(type="log", exponentformat="power", showexponent="all")
    fig.update_yaxes(title_text="max |x − x*| (all segments)", col=1)
    fig.update_xaxes(title_text="Jacobi pass per segment", row=rows)
    fig.update_layout(legend=dict(orientation="h", y=-0.18 if rows == 1 else -0.1),
                      title=dict(text="Measured GS-Jacobi convergence per block (forward block index): "
                                      "S segments, solid = zeros init, dotted = z init, dash-dot = Anderson", font=dict(size=14)))
    return fig_html(fig, 380 * rows + 80)


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials.state == "COMPLETE"].copy()


def history_figure(st: StudyFolder, chosen: int | None, seq_latency: float | None) -> str:
    import plotly.graph_objects as go

    df = st.trials.copy()
    df["kind"] = [trial_state(r) for r in df.to_dict("records")]
    fig = go.Figure()
    for kind, sym in (("feasible", "circle"), ("infeasible", "circle-open"), ("pruned", "x"), ("failed", "x")):
        d = df[df.kind == kind]
        if d.empty:
            continue
        done = kind in ("feasible", "infeasible")
        y = d.latency_s * 1e3 if done else np.zeros(len(d))
        hover = []
        for r in d.to_dict("records"):
            s = f"trial {r['number']}" + (f" (seed: {_seed_name(r)})" if _seed_name(r) else "")
            if done:
                s += f"<br>latency {ms(r['latency_s'])} ms<br>FID gap {num(r.get('fid_gap'), '+.3g')}"
            elif kind == "pruned":
                s += f"<br>pruned at warm-up: pixel RMSE {num(r.get('warmup_rmse'), '.3g')} (0–255)"
            else:
                s += "<br>failed"
            hover.append(s)
        label = {"pruned": "pruned (warm-up proxy; no latency, drawn at 0)",
                 "failed": "failed (drawn at 0)"}.get(kind, kind)
        fig.add_trace(go.Scatter(x=d.number, y=y, mode="markers", name=label, text=hover,
                                 hovertemplate="%{text}<extra></extra>",
                                 marker=dict(color=STATE_COLORS[kind], symbol=sym, size=9,
                                             line=dict(width=1.5, color=STATE_COLORS[kind]))))
    feas = df[df.kind == "feasible"].sort_values("number")
    if not feas.empty:
        best = (feas.latency_s * 1e3).cummin()
        xs = list(feas.number) + [int(df.number.max())]
        ys = list(best) + [float(best.iloc[-1])]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=STATE_COLORS["feasible"], shape="hv"),
                                 name="best feasible so far", hoverinfo="skip"))
    if chosen is not None and (df.number == chosen).any():
        r = df[df.number == chosen].iloc[0]
        fig.add_trace(go.Scatter(x=[chosen], y=[r.latency_s * 1e3], mode="markers", name="chosen (verified)",
                                 marker=dict(symbol="star", size=18, color="#f2b705",
                                             line=dict(color="black", width=1))))
    if seq_latency:
        fig.add_trace(go.Scatter(x=[int(df.number.min()), int(df.number.max())], y=[seq_latency * 1e3] * 2,
                                 mode="lines", line=dict(dash="dash", color="#555"),
                                 name=f"sequential ({ms(seq_latency)} ms)", hoverinfo="skip"))
    fig.update_layout(title=dict(text=f"Optimisation history — objective: latency per batch of "
                                      f"{st.summary.get('batch', '?')}", font=dict(size=14)),
                      xaxis_title="trial number", yaxis_title="latency (ms / batch)",
                      legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(rangemode="tozero")
    return fig_html(fig, 430)


def scatter_figure(st: StudyFolder, chosen: int | None) -> str:
    import plotly.graph_objects as go

    ext, n = st.search_fid
    tol = float(st.summary["tolerance"])
    floor = st.summary.get("noise_floor") or {}
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
        seeds = [_seed_name(r) for r in d.to_dict("records")]
        hover = [f"trial {t}" + (f" (seed: {s})" if s else "") + f"<br>latency {ms(l)} ms<br>FID gap {g:+.3g}"
                 for t, s, l, g in zip(d.number, seeds, d.latency_s, d.fid_gap)]
        fig.add_trace(go.Scatter(x=d.latency_s * 1e3, y=d.fid_gap, mode="markers+text", name=kind,
                                 text=seeds, textposition="top center", hovertext=hover,
                                 hovertemplate="%{hovertext}<extra></extra>",
                                 marker=dict(color=STATE_COLORS[kind], size=10,
                                             symbol="circle" if kind == "feasible" else "circle-open",
                                             line=dict(width=1.5, color=STATE_COLORS[kind]))))
    if chosen is not None and (df.number == chosen).any():
        r = df[df.number == chosen].iloc[0]
        fig.add_trace(go.Scatter(x=[r.latency_s * 1e3], y=[r.fid_gap], mode="markers", name="chosen",
                                 marker=dict(symbol="star", size=18, color="#f2b705",
                                             line=dict(color="black", width=1))))
    fig.update_layout(title=dict(text=f"Latency vs FID gap to sequential (same noise; {fid_tag(ext, n)})",
                                 font=dict(size=14)),
                      xaxis_title="latency (ms / batch)", yaxis_title=f"FID gap ({fid_tag(ext, n)})",
                      legend=dict(orientation="h", y=-0.2))
    return fig_html(fig, 460)


def importance_figure(st: StudyFolder) -> str:
    """Parameter importances (PED-ANOVA) for latency and for the FID gap."""
    import optuna
    import plotly.graph_objects as go

    db = st.path / "study.db"
    if not db.is_file():
        return note("Parameter importances: no study.db in the study folder (the search used another "
                    "Optuna storage).")
    name = st.summary.get("study")
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
            for label, target in (("latency", None),
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


def parallel_figure(st: StudyFolder) -> str:
    import plotly.graph_objects as go

    df = completed(st.trials)
    if len(df) < 2:
        return note(f"Parallel coordinates need at least 2 completed trials ({len(df)} completed).")
    dims = []

    def categorical(label, values):
        vals = list(values)
        cats = sorted({v for v in vals if not _isnan(v)}, key=_sort_key)
        if not cats:
            return
        code = {c: i for i, c in enumerate(cats)}
        dims.append(dict(label=label, values=[code.get(v, np.nan) for v in vals],
                         tickvals=list(range(len(cats))), ticktext=[_fmt_cat(c) for c in cats],
                         range=[-0.3, len(cats) - 0.7]))

    def numeric(label, values):
        vals = np.asarray(values, dtype=float)
        fin = vals[np.isfinite(vals)]
        if fin.size == 0:
            return
        lo, hi = float(fin.min()), float(fin.max())
        pad = 0.5 if hi == lo else 0.0
        dims.append(dict(label=label, values=vals, range=[lo - pad, hi + pad]))

    if "param_tol" in df:
        categorical("tol", df.param_tol)
    for k in range(st.B - 1, -1, -1):  # sampling order
        if f"param_b{k}_segments" in df:
            categorical(f"b{k} segs", df[f"param_b{k}_segments"])
        if f"param_b{k}_init" in df:
            categorical(f"b{k} init", df[f"param_b{k}_init"])
        iters = []
        for r in df.to_dict("records"):  # the budget of the segment count actually chosen
            S = r.get(f"param_b{k}_segments")
            iters.append(np.nan if _isnan(S) else r.get(f"param_b{k}_iters_s{int(S)}", np.nan))
        numeric(f"b{k} iters", iters)
    ext, n = st.search_fid
    numeric("FID gap", df.fid_gap)
    lat = (df.latency_s * 1e3).to_numpy()
    fig = go.Figure(go.Parcoords(
        line=dict(color=lat, colorscale="Viridis", showscale=True,
                  colorbar=dict(title=dict(text="latency<br>ms/batch"))),
        dimensions=dims, labelangle=-25, labelside="top"))
    fig.update_layout(title=dict(text=f"Parallel coordinates over the {len(df)} completed trials "
                                      f"(blocks in sampling order; FID gap: {fid_tag(ext, n)}; "
                                      f"colour = latency)", font=dict(size=14), y=0.97))
    return fig_html(fig, 480, top=130)


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _sort_key(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _fmt_cat(v) -> str:
    try:
        f = float(v)
        return f"{f:g}"
    except (TypeError, ValueError):
        return str(v)


# --- schedules compared ----------------------------------------------------------------------

def plans_from_params(row: dict, B: int) -> list[dict] | None:
    """A trial's schedule (sampling order) rebuilt from its param_* columns in trials.csv."""
    try:
        tol = float(row["param_tol"])
        plans = []
        for k in range(B - 1, -1, -1):
            S = int(row[f"param_b{k}_segments"])
            plans.append({"block": k, "segments": S, "max_iters": int(row[f"param_b{k}_iters_s{S}"]),
                          "init": str(row[f"param_b{k}_init"]), "tol": tol,
                          "anderson": int(float(row.get(f"param_b{k}_anderson", 0) or 0))})
        return plans
    except (KeyError, TypeError, ValueError):
        return None


def format_plan(p: dict, T: int) -> str:
    if p["segments"] >= T:
        return "token by token"
    tol = f", tol {p['tol']:g}" if p.get("tol") else ""
    anderson = f", Anderson m={p['anderson']}" if p.get("anderson") else ""
    return f"S={p['segments']} × ≤{p['max_iters']}, {p['init']}{tol}{anderson}"


def format_used(iters) -> str:
    if not iters:
        return "–"
    total = sum(iters)
    return f"{total}" if len(iters) == 1 else f"{total} ({len(iters)} seg, max {max(iters)})"


def comparison_rows(st: StudyFolder) -> list[dict]:
    """Chosen schedule first, then the seed schedules, each with what the search measured."""
    s = st.summary
    trials = st.trials
    rows_by_trial = {int(r["number"]): r for r in trials.to_dict("records")} if trials is not None else {}
    out = []
    if st.schedule is not None:
        t = s.get("chosen_trial")
        r = rows_by_trial.get(t, {})
        prov = st.schedule.provenance
        seed = _seed_name(r) if r else ""
        out.append({"name": f"<b>chosen</b>: {esc(st.schedule.name)}" + (f" (= {esc(seed)} seed)" if seed else ""),
                    "key": "chosen", "trial": t, "status": "feasible, verified",
                    "latency_s": prov.get("latency_search_s", r.get("latency_s")),
                    "fid": (prov.get("fid_search") or {}).get("fid", r.get("fid")),
                    "fid_gap": (prov.get("fid_search") or {}).get("gap", r.get("fid_gap")),
                    "proxy": prov.get("proxy") or {}, "iters": s.get("chosen_iters"),
                    "plans": [vars(p) if not isinstance(p, dict) else p for p in
                              (st.schedule.to_dict()["blocks"])]})
    seeds = s.get("seeds") or {}
    by_seed = {_seed_name(r): r for r in rows_by_trial.values() if _seed_name(r)}
    for name in list(SEED_ORDER) + [k for k in seeds if k not in SEED_ORDER]:
        rec, r = seeds.get(name), by_seed.get(name)
        if rec is None and r is None:
            continue
        title = SEED_TITLES.get(name, name)
        if rec is not None:
            out.append({"name": esc(title), "key": name, "trial": rec.get("trial"),
                        "status": "feasible" if rec.get("feasible") else "infeasible (over tolerance)",
                        "latency_s": rec.get("latency_s"), "fid": rec.get("fid"), "fid_gap": rec.get("fid_gap"),
                        "proxy": rec.get("proxy") or {}, "iters": rec.get("iters"),
                        "plans": rec.get("schedule") or plans_from_params(r or {}, st.B)})
        else:
            kind = trial_state(r)
            status = (f"pruned at warm-up (pixel RMSE {num(r.get('warmup_rmse'), '.3g')} of 255)"
                      if kind == "pruned" else kind)
            done = kind in ("feasible", "infeasible")
            out.append({"name": esc(title), "key": name, "trial": r.get("number"), "status": status,
                        "latency_s": r.get("latency_s") if done else None,
                        "fid": r.get("fid") if done else None, "fid_gap": r.get("fid_gap") if done else None,
                        "proxy": {"rmse_mean": r.get("proxy_rmse_mean"), "rmse_max": r.get("proxy_rmse_max")}
                        if done else {}, "iters": None, "plans": plans_from_params(r, st.B)})
    final = s.get("final_latency") or {}
    for row in out:  # the interleaved re-timing at the end of the search, where there was one
        row["final_s"] = (final.get(row["key"]) or {}).get("median_s")
    return out


def comparison_tables(st: StudyFolder, seq_latency: float | None) -> str:
    rows = comparison_rows(st)
    if not rows:
        return note("No schedules to compare (summary.json lists no seed trials).")
    ext, n = st.search_fid
    T, B = st.T, st.B
    head = ["schedule", "trial", "status", f"latency (ms / batch of {st.summary.get('batch', '?')})",
            "speed-up vs sequential", "re-timed latency (ms)", "re-timed speed-up",
            f"FID ({esc(fid_tag(ext, n))})", "FID gap",
            "paired proxy RMSE mean / max (0–255)", "transformer passes per batch"]
    body = []
    for r in rows:
        lat = r["latency_s"]
        sp = f"{seq_latency / lat:.2f}×" if lat and seq_latency else "–"
        seq_final = next((q["final_s"] for q in rows if q["key"] == "sequential"), None)
        sp_final = f"{seq_final / r['final_s']:.2f}×" if r["final_s"] and seq_final else "–"
        px = r["proxy"] or {}
        passes = sum(sum(i) for i in r["iters"]) if r["iters"] else None
        body.append([r["name"], esc(r["trial"] if r["trial"] is not None else "–"), esc(r["status"]),
                     ms(lat), sp, ms(r["final_s"]), sp_final, num(r["fid"], ".4g"), num(r["fid_gap"], "+.3g"),
                     f"{num(px.get('rmse_mean'), '.3g')} / {num(px.get('rmse_max'), '.3g')}",
                     esc(passes if passes is not None else "–")])
    main = table(head, body, cls="compare", row_cls=["chosen" if r["key"] == "chosen" else "" for r in rows],
                 caption=(
        f"Measured in the search on the same noise (batch {st.summary.get('batch', '?')}, "
        f"{esc((st.summary.get('device') or {}).get('device_class', '?'))}); speed-up = sequential "
        f"latency {ms(seq_latency)} ms / latency. Re-timed: the same schedules timed again, interleaved, "
        f"after the search (the numbers the summary and the schedule file quote). "
        f"FID and gap: {esc(fid_tag(ext, n))}."))
    # per block, sampling order
    names = [r["name"] for r in rows]
    head2 = ["sampling step", "forward block"] + names
    body2 = []
    for i in range(B):
        k = B - 1 - i
        cells = [str(i), str(k)]
        for r in rows:
            plans = r["plans"] or []
            p = next((q for q in plans if int(q["block"]) == k), None)
            used = r["iters"][i] if r["iters"] and i < len(r["iters"]) else None
            if p is None:
                cells.append("–")
            else:
                cells.append(("<b>" if r["key"] == "chosen" else "") +f"{esc(format_plan(p, T))}<br><span class='dim'>passes used: "
                             f"{esc(format_used(used))}</span>")
        body2.append(cells)
    per_block = table(head2, body2, cls="compare", caption=(
        f"Plan per block in <b>sampling order</b> (step 0 = forward block {B - 1}, run first): "
        f"S segments × at most that many Jacobi passes each, initial guess, early-stop tol; "
        f"“passes used” = transformer passes actually run per block on the first search batch "
        f"(T={T} tokens; token by token = {max(T - 1, 0)} passes)."))
    return main + per_block


# --- pictures --------------------------------------------------------------------------------

def grid_png(u8: np.ndarray, nrow: int = 8, scale: int = 3, gap: int = 255) -> bytes:
    """uint8 N×c×H×W -> PNG bytes of one grid with 1-pixel gaps, nearest-neighbour upscaled."""
    from PIL import Image

    n, c, h, w = u8.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = np.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), gap, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = u8[i]
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def nice_gain(max_diff: float) -> float:
    """Largest 1/2/5 x 10^k gain that maps the largest difference to at most 255 (>= 1)."""
    if max_diff <= 0:
        return 1.0
    target = 255.0 / max_diff
    if target <= 1:
        return 1.0
    e = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**e <= target:
            return float(m * 10**e)
    return float(10**e)


@dataclass
class Pictures:
    seq_png: bytes
    sched_png: bytes | None
    diff_png: bytes | None
    gain: float
    max_diff: float
    rmse: float
    n: int
    seed: int
    labels: str
    seq_passes: int
    sched_passes: int | None


def make_pictures(model, schedule, n: int, seed: int) -> Pictures:
    import torch

    from tarflow.sampling import make_noise, sample
    from tarflow.schedule import builtin_schedule

    K = model.cfg.num_classes
    noise = make_noise(n, model, seed)
    labels = torch.arange(n) % K if K else None
    x_seq, st_seq = sample(model, noise, builtin_schedule("sequential", model), labels=labels)
    to255 = lambda x: (x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # noqa: E731
    from tarflow.data import to_uint8

    seq_png = grid_png(to_uint8(x_seq))
    lab = f"class i mod {K} for image i" if K else "unconditional"
    if schedule is None:
        return Pictures(seq_png, None, None, 1.0, 0.0, 0.0, n, seed, lab, st_seq.passes, None)
    x_s, st_s = sample(model, noise, schedule, labels=labels)
    d = (to255(x_s) - to255(x_seq)).abs()
    d = torch.nan_to_num(d, nan=255.0)
    max_d = float(d.max())
    rmse = float(d.double().pow(2).mean().sqrt())
    gain = nice_gain(max_d)
    diff_u8 = (d * gain).clamp(0, 255).round().to(torch.uint8).numpy()
    return Pictures(seq_png, grid_png(to_uint8(x_s)), grid_png(diff_u8, gap=96), gain, max_d, rmse,
                    n, seed, lab, st_seq.passes, st_s.passes)


# --- page ------------------------------------------------------------------------------------

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


def _plot(div: str) -> str:
    return div if div.startswith("<div class=\"note\"") else f'<div class="plot">{div}</div>'


def build_html(st: StudyFolder, *, pics: Pictures | None, model_note: str | None,
               checkpoint_shown: str, plotly_js: str) -> str:
    s = st.summary
    ext, n = st.search_fid
    arch = st.arch
    B, T = st.B, st.T
    dev = s.get("device") or {}
    floor = s.get("noise_floor") or {}
    std = floor.get("std")
    tol = float(s["tolerance"])
    seeds = s.get("seeds") or {}
    seq_latency = (seeds.get("sequential") or {}).get("latency_s") or \
        ((s.get("sequential") or {}).get("latency") or {}).get("median_s")
    sched = st.schedule
    prov = sched.provenance if sched is not None else {}
    chosen = s.get("chosen_trial") if sched is not None else None
    fp = s.get("model") or {}
    sha = str(fp.get("weights_sha256") or "?")
    study_shown = display_path(st.path)

    parts = [f"<h1>TarFlow GS-Jacobi schedule report</h1>",
             f'<p class="sub">study <code>{esc(study_shown)}</code> · model <code>{esc(checkpoint_shown)}</code> · '
             f'report written {esc(time.strftime("%Y-%m-%d %H:%M"))}</p>',
             '<nav><a href="#summary">Summary</a><a href="#profile">Profile</a><a href="#search">Search</a>'
             '<a href="#schedules">Schedules compared</a><a href="#samples">Samples</a>'
             '<a href="#usage">How to use</a></nav>']

    # --- summary
    parts.append('<h2 id="summary">Summary</h2>')
    if sched is None:
        parts.append(note(f"No schedule was exported: no schedule faster than sequential met the FID "
                          f"tolerance +{tol:g} ({esc(fid_tag(ext, n))}) in {s.get('trials', '?')} trials. "
                          "The profile and the search below show what was tried.", "alert"))
    if model_note:
        parts.append(note(model_note, "alert"))
    if s.get("tolerance_warning"):
        parts.append(note("Tolerance warning: " + esc(s["tolerance_warning"]), "warn"))
    for t in st.notes:
        parts.append(note(esc(t)))
    cards = []
    if sched is not None:
        fs, fv = prov.get("fid_search") or {}, prov.get("fid_verify") or {}
        cards.append(("speed-up vs sequential", f"{num(prov.get('speedup_vs_sequential'), '.2f')}×",
                      f"{ms(prov.get('latency_s'))} ms vs {ms(prov.get('sequential_latency_s'))} ms per batch of "
                      f"{esc(s.get('batch', '?'))} on {esc(dev.get('device_class', '?'))}"))
        if fv:
            cards.append(("FID gap, re-verified", f"{num(fv.get('gap'), '+.3g')} ± {num(std, '.3g')}",
                          f"FID {num(fv.get('fid'))} vs sequential {num(fv.get('fid_sequential'))} "
                          f"({esc(fid_tag(fv.get('extractor', '?'), fv.get('n', '?')))}, fresh noise); "
                          f"± = noise-floor std ({esc(fid_tag(floor.get('extractor', ext), floor.get('n', n)))})"))
        cards.append(("FID gap in the search", f"{num(fs.get('gap'), '+.3g')} ± {num(std, '.3g')}",
                      f"FID {num(fs.get('fid'))} vs sequential {num(fs.get('sequential'))} "
                      f"({esc(fid_tag(fs.get('extractor', ext), fs.get('n', n)))})"))
    else:
        cards.append(("speed-up vs sequential", "none", "no schedule met the tolerance"))
    cards.append(("tolerance", f"+{tol:g} FID",
                  f"noise floor {num(floor.get('mean'))} ± {num(std, '.3g')} over "
                  f"{len(floor.get('values', []))} seeds ({esc(fid_tag(floor.get('extractor', ext), floor.get('n', n)))}); "
                  f"resolution 2√2·std = {num(floor.get('resolution') or (2 * math.sqrt(2) * std if std else None), '.3g')}"))
    cards.append(("trials", f"{s.get('trials', '?')}",
                  f"{s.get('feasible', '?')} feasible; search {num(s.get('search_seconds'), '.0f')} s"
                  + (f"; chosen trial {chosen}" if chosen is not None else "")))
    parts.append('<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div><div class="d">{d}</div></div>'
        for k, v, d in cards) + "</div>")
    arch_txt = (f"{arch.get('num_blocks', '?')} blocks × {arch.get('layers_per_block', '?')} layers, width "
                f"{arch.get('channels', '?')}, head dim {arch.get('head_dim', '?')}, "
                f"{arch.get('img_size', '?')}² × {arch.get('in_channels', '?')} image, patch {arch.get('patch_size', '?')} "
                f"→ T={T} tokens, {arch.get('num_classes', 0) or 'no'} classes, "
                f"{'affine' if arch.get('nvp', True) else 'shift-only'}")
    cfg = s.get("config") or {}
    kv = [("model", esc(arch_txt)),
          ("fingerprint", f"<code title='{esc(sha)}'>sha256 {esc(sha[:16])}…</code>"),
          ("checkpoint", f"<code>{esc(checkpoint_shown)}</code>"),
          ("device", esc(f"{dev.get('device_class', '?')} — {dev.get('device_name', '?')}, torch {dev.get('torch', '?')}")),
          ("batch", esc(f"{s.get('batch', '?')} (latency = median over timed batches of this size)")),
          ("tolerance", esc(f"FID may rise by at most {tol:g} over sequential on the same noise")),
          ("FID in the search", esc(f"{fid_tag(ext, n)}; sequential FID {num((s.get('sequential') or {}).get('fid'))}")),
          ("FID re-verification", esc(fid_tag((prov.get("fid_verify") or {}).get("extractor")
                                              or cfg.get("verify_extractor", "?"), cfg.get("verify_n", "?"))
                                      + " on fresh noise, for the fastest feasible candidates")),
          ("study", esc(f"Optuna study '{s.get('study', '?')}' in study.db, seed {cfg.get('seed', '?')}"))]
    parts.append('<table class="kv">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv) + "</table>")

    # --- profile
    parts.append('<h2 id="profile">Profile</h2>')
    if st.profile is None:
        parts.append(note("No profile in this study folder (profile/profile.json missing)."))
    else:
        meta = st.profile.meta
        parts.append(f'<p class="sub">Measured on {esc(meta.get("n", "?"))} calibration images '
                     f'({esc(meta.get("labels", ""))}; curves on {esc(meta.get("curve_n", "?"))}). '
                     f'Block numbers are <b>forward</b> indices; sampling runs block {B - 1} first '
                     f'(sampling step 0) and block 0 last.</p>')
        parts.append(_plot(profile_bars(st)))
        parts.append(_plot(convergence_figure(st)))
        parts.append(f'<p class="dim">S={T} (token by token) is exact after one pass per token and is not drawn. '
                     'Error = max over tokens, channels, images and segments of |x − x*| after each pass; '
                     'zero errors are not drawn on the log axis.</p>')
        parts.append(profile_table(st))

    # --- search
    parts.append('<h2 id="search">Search</h2>')
    if st.trials is None or st.trials.empty:
        parts.append(note("No trials.csv: the search history is not available."))
    else:
        parts.append('<div class="row2">' + _plot(history_figure(st, chosen, seq_latency))
                     + _plot(scatter_figure(st, chosen)) + "</div>")
        parts.append('<div class="row2">' + _plot(importance_figure(st)) + top_trials_table(st, chosen) + "</div>")
        parts.append(_plot(parallel_figure(st)))
        parts.append(f'<p class="dim">Constraint: FID gap ({esc(fid_tag(ext, n))}) − tolerance ≤ 0. Pruned '
                     'trials stopped after the warm-up batch because their pixel RMSE to the sequential '
                     'samples was hopeless; they have no latency.</p>')

    # --- schedules
    parts.append('<h2 id="schedules">Schedules compared</h2>')
    if sched is None:
        parts.append(note("No schedule was exported; the seed schedules the search started from:", "warn"))
    if st.trials is not None:
        parts.append(comparison_tables(st, seq_latency))
    else:
        parts.append(note("trials.csv is missing: no comparison."))
    if sched is not None and prov.get("speedup_vs_seeds"):
        parts.append('<p class="dim">Chosen schedule speed-up over each seed (seed latency / chosen '
                     'latency): ' + esc(", ".join(
            f"{k} {v:.2f}×" for k, v in prov["speedup_vs_seeds"].items())) + "</p>")

    # --- samples
    parts.append('<h2 id="samples">Samples</h2>')
    if pics is None:
        parts.append(note("No pictures (the model could not be loaded)."))
    else:
        figs = [f'<figure><img alt="sequential samples" src="{data_uri(pics.seq_png)}">'
                f'<figcaption><b>sequential</b> (exact), {pics.seq_passes} transformer passes</figcaption></figure>']
        if pics.sched_png is not None:
            figs.append(f'<figure><img alt="chosen schedule samples" src="{data_uri(pics.sched_png)}">'
                        f'<figcaption><b>chosen schedule</b> ({esc(sched.name)}), {pics.sched_passes} '
                        f'transformer passes</figcaption></figure>')
            same = " — identical images" if pics.max_diff == 0 else ""
            figs.append(f'<figure><img alt="amplified difference" src="{data_uri(pics.diff_png)}">'
                        f'<figcaption><b>|Δ| × {pics.gain:g}</b> (black = equal){same}; max |Δ| = '
                        f'{pics.max_diff:.3g} of 255, pixel RMSE {pics.rmse:.3g} of 255</figcaption></figure>')
        parts.append('<div class="pics">' + "".join(figs) + "</div>")
        parts.append(f'<p class="dim">{pics.n} images from the same noise (seed {pics.seed}, '
                     f'<code>make_noise</code>), labels: {esc(pics.labels)}, no guidance, no denoising step; '
                     f'sampled for this report on the checkpoint above.</p>')
        if pics.sched_png is None:
            parts.append(note("No chosen schedule: only the sequential sampler is shown."))

    # --- usage
    parts.append('<h2 id="usage">How to use this schedule</h2>')
    sched_path = f"{study_shown}/schedule.json"
    if sched is None:
        parts.append(note("Nothing to use: no schedule was exported. Try a larger tolerance, more trials "
                          "or a larger --n (see the tolerance warning above)."))
    else:
        parts.append(f"<pre><code>tarflow-tuner sample --checkpoint {esc(checkpoint_shown)} \\\n"
                     f"    --schedule {esc(sched_path)} --n {esc(s.get('batch', 64))} "
                     f"--device {esc(dev.get('device_class', 'auto'))} --out samples</code></pre>")
        nb = int(s.get("batch") or 64)
        lab = (f"labels = torch.arange({nb}) % {arch.get('num_classes')}  # class of each image\n"
               if arch.get("num_classes") else "labels = None  # unconditional model\n")
        parts.append(f"<pre><code>import torch\n"
                     f"from tarflow.checkpoint import load_checkpoint\n"
                     f"from tarflow.sampling import make_noise, sample\n"
                     f"from tarflow.schedule import resolve_schedule\n\n"
                     f"model = load_checkpoint({esc(repr(checkpoint_shown))})\n"
                     f"schedule = resolve_schedule({esc(repr(sched_path))}, model)  # checks the fingerprint\n"
                     f"{esc(lab)}"
                     f"x, stats = sample(model, make_noise({nb}, model, seed=0), schedule, labels)  "
                     f"# x: model space [-1, 1]"
                     f"</code></pre>")
        parts.append(f'<p class="dim">Tuned for batch {esc(s.get("batch", "?"))} on '
                     f'{esc(dev.get("device_class", "?"))}; another device or batch size runs correctly but may '
                     'not be the fastest choice there. The schedule refuses to run on a model with other '
                     'weights unless <code>--force</code> is given.</p>')
    parts.append(f"<footer>tarflow-tuner {esc(_tool_version())} report · "
                 "self-contained: plotly.js and images are embedded, nothing is loaded from the network.</footer>")

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>TarFlow schedule report — {esc(study_shown)}</title>\n<style>{CSS}</style>\n"
            f"<script type=\"text/javascript\">{plotly_js}</script>\n</head>\n<body>\n<main>\n"
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


def top_trials_table(st: StudyFolder, chosen: int | None, k: int = 12) -> str:
    """The fastest completed trials, feasible or not, with their FID gap."""
    df = completed(st.trials).sort_values("latency_s").head(k)
    ext, n = st.search_fid
    rows, cls = [], []
    for r in df.to_dict("records"):
        rows.append([esc(r["number"]), esc(_seed_name(r) or "–"), ms(r["latency_s"]), num(r.get("fid_gap"), "+.3g"),
                     "yes" if _truthy(r.get("feasible")) else "<span style='color:#d1495b'>no</span>",
                     num(r.get("proxy_rmse_mean"), ".3g"), esc(num(r.get("passes"), ".0f"))])
        cls.append("chosen" if chosen is not None and int(r["number"]) == chosen else "")
    return ('<div class="tablebox"><h3>Fastest completed trials</h3>'
            + table(["trial", "seed", "latency (ms)", f"FID gap ({esc(fid_tag(ext, n))})", "feasible",
                     "proxy RMSE (0–255)", "passes"], rows, cls="compare", row_cls=cls,
                    caption="Highlighted: the chosen trial. Passes: over all search batches.") + "</div>")


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tarflow-tuner")
    except PackageNotFoundError:
        return ""


def profile_table(st: StudyFolder) -> str:
    prof = st.profile.blocks.sort_values("block")
    rows = []
    for r in prof.to_dict("records"):
        k = int(r["block"])
        need = {init: st.profile.iters_needed(k, 1, init, 1e-3) for init in ("zeros", "z")}
        rows.append([str(k), str(int(r["sampling_step"])), num(r.get("crm"), ".3g"), num(r.get("crm_share"), ".1f"),
                     num(r.get("igm_zeros"), ".3g"), num(r.get("igm_z"), ".3g"), esc(r.get("best_init", "")),
                     f"{need['zeros']} / {need['z']}"])
    return table(["forward block", "sampling step", "CRM", "CRM share (%)", "IGM zeros", "IGM z", "best init",
                  "passes to 1e-3, one segment (zeros / z)"], rows, cls="compare",
                 caption="Rows in <b>forward</b> block order; sampling step 0 runs first.")


# --- entry point -----------------------------------------------------------------------------

def write_report(study_dir: Path, out_html: Path, *, checkpoint: Path | None = None, n_grid: int = 32,
                 device="cpu", model=None, seed: int | None = None) -> Path:
    """Write the HTML report of `study_dir` to `out_html` (atomically); returns the path.

    checkpoint: model to sample the pictures with (default: the one the study records; a relative
    path is tried against the current folder, then the repository). `model` may be passed instead
    (already loaded). Raises UserError for a folder that is not a study or an unusable checkpoint.
    """
    import plotly.offline

    from tarflow.checkpoint import load_checkpoint

    st = read_study(study_dir)
    out_html = Path(out_html)
    if n_grid < 1:
        raise UserError(f"n_grid must be >= 1, got {n_grid}")
    if model is None:
        ckpt = resolve_checkpoint(checkpoint, st.summary)
        model = load_checkpoint(ckpt, device=device)
        shown = display_path(ckpt)
    else:
        given = checkpoint or st.summary.get("checkpoint") or "model"
        shown = display_path(given)
    model_note = None
    tuned = st.summary.get("model") or {}
    fp = model.fingerprint
    if tuned.get("arch") and fp.get("arch") and tuned["arch"] != fp["arch"]:
        raise UserError(f"checkpoint {shown} has another architecture than the model this study tuned; "
                        "pass the right --checkpoint")
    sched = st.schedule
    if sched is not None:
        force = bool(tuned.get("weights_sha256") and fp.get("weights_sha256")
                     and tuned["weights_sha256"] != fp["weights_sha256"])
        if force:
            model_note = (f"The checkpoint {esc(shown)} has other weights (sha256 "
                          f"{esc(str(fp.get('weights_sha256'))[:16])}…) than the model this study tuned "
                          f"({esc(str(tuned.get('weights_sha256'))[:16])}…): the pictures come from the current "
                          "checkpoint, the numbers from the study.")
        sched.check_fits(model, force=force)
    elif tuned.get("weights_sha256") and fp.get("weights_sha256") and tuned["weights_sha256"] != fp["weights_sha256"]:
        model_note = (f"The checkpoint {esc(shown)} has other weights than the model this study tuned: the "
                      "pictures come from the current checkpoint, the numbers from the study.")
    if seed is None:
        seed = int((st.summary.get("config") or {}).get("seed", 0))
    pics = make_pictures(model, sched, n_grid, seed)
    page = build_html(st, pics=pics, model_note=model_note, checkpoint_shown=shown,
                      plotly_js=plotly.offline.get_plotlyjs())
    atomic_write_text(out_html, page)
    return out_html


__all__ = ["write_report", "read_study", "StudyFolder"]
