"""The report's plotly figures: profile, convergence, search history, latency vs FID gap,
parameter importances, parallel coordinates. Each returns an HTML fragment (plotly.js is
inlined once by the page)."""

from __future__ import annotations

import math
import warnings

import numpy as np

from .html import PALETTE, STATE_COLORS, _seed_name, completed, esc, fid_tag, fig_html, ms, note, num, trial_state
from .study import StudyFolder



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


def _objective_axis(st: StudyFolder):
    """What the search minimised, as (column, scale, title, unit) for the history plot."""
    objective = str(st.summary.config.get("objective", "latency"))
    if objective == "passes":
        return "objective", 1.0, "serial transformer passes per batch", "passes"
    if objective.startswith("cost:"):
        dev = (st.summary.schedule or {}).get("provenance", {}).get("objective_device") or "the profiled device"
        return "objective", 1e3, f"modelled latency on {dev} (ms / batch)", "ms"
    return "latency_s", 1e3, "latency (ms / batch)", "ms"


def history_figure(st: StudyFolder, chosen: int | None, seq_latency: float | None) -> str:
    """Each trial's objective value (the one the search minimised) in trial order."""
    import plotly.graph_objects as go

    col, scale, title, unit = _objective_axis(st)
    df = st.trials.copy()
    if col not in df:  # studies written before the objective column existed
        col, scale, title, unit = "latency_s", 1e3, "latency (ms / batch)", "ms"
    df["kind"] = [trial_state(r) for r in df.to_dict("records")]
    fig = go.Figure()
    for kind, sym in (("feasible", "circle"), ("infeasible", "circle-open"), ("pruned", "x"), ("failed", "x")):
        d = df[df.kind == kind]
        if d.empty:
            continue
        done = kind in ("feasible", "infeasible")
        y = d[col] * scale if done else np.zeros(len(d))
        hover = []
        for r in d.to_dict("records"):
            s = f"trial {r['number']}" + (f" (seed: {_seed_name(r)})" if _seed_name(r) else "")
            if done:
                s += (f"<br>{num(r[col] * scale, '.4g')} {unit}<br>latency here {ms(r['latency_s'])} ms"
                      f"<br>FID gap {num(r.get('fid_gap'), '+.3g')}")
            elif kind == "pruned":
                s += f"<br>pruned at warm-up: pixel RMSE {num(r.get('warmup_rmse'), '.3g')} (0–255)"
            else:
                s += "<br>failed"
            hover.append(s)
        label = {"pruned": "pruned (warm-up proxy; no value, drawn at 0)",
                 "failed": "failed (drawn at 0)"}.get(kind, kind)
        fig.add_trace(go.Scatter(x=d.number, y=y, mode="markers", name=label, text=hover,
                                 hovertemplate="%{text}<extra></extra>",
                                 marker=dict(color=STATE_COLORS[kind], symbol=sym, size=9,
                                             line=dict(width=1.5, color=STATE_COLORS[kind]))))
    feas = df[df.kind == "feasible"].sort_values("number")
    if not feas.empty:
        best = (feas[col] * scale).cummin()
        xs = list(feas.number) + [int(df.number.max())]
        ys = list(best) + [float(best.iloc[-1])]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=STATE_COLORS["feasible"], shape="hv"),
                                 name="best feasible so far", hoverinfo="skip"))
    if chosen is not None and (df.number == chosen).any():
        r = df[df.number == chosen].iloc[0]
        fig.add_trace(go.Scatter(x=[chosen], y=[r[col] * scale], mode="markers", name="chosen (verified)",
                                 marker=dict(symbol="star", size=18, color="#f2b705",
                                             line=dict(color="black", width=1))))
    seq = df[(df.get("seed") == "sequential") & df.kind.isin(["feasible", "infeasible"])] if "seed" in df else df[:0]
    ref = float(seq[col].iloc[0]) * scale if not seq.empty else (
        seq_latency * 1e3 if seq_latency and col == "latency_s" else None)
    if ref:
        fig.add_trace(go.Scatter(x=[int(df.number.min()), int(df.number.max())], y=[ref] * 2,
                                 mode="lines", line=dict(dash="dash", color="#555"),
                                 name=f"sequential ({num(ref, '.4g')} {unit})", hoverinfo="skip"))
    fig.update_layout(title=dict(text=f"Optimisation history — objective: {title.split(' (')[0]}, batch of "
                                      f"{st.summary.batch}", font=dict(size=14)),
                      xaxis_title="trial number", yaxis_title=title,
                      legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(rangemode="tozero")
    return fig_html(fig, 430)


def scatter_figure(st: StudyFolder, chosen: int | None) -> str:
    import plotly.graph_objects as go

    ext, n = st.search_fid
    tol = st.summary.tolerance
    floor = st.summary.noise_floor
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
