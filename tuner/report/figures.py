"""The report's profile figures: per-block difficulty and measured convergence. Each returns an
HTML fragment (plotly.js is inlined once by the page); the search's figures are in
search_figures."""

from __future__ import annotations

from .html import PALETTE, fig_html, note
from .study import StudyFolder, profile_inits


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
    for i, init in enumerate(profile_inits(prof)):
        col = f"igm_{init}"
        fig.add_trace(go.Bar(x=labels, y=prof[col], name=f"IGM, init={init}", marker_color=PALETTE[1 + i],
                             hovertemplate=f"%{{x}}<br>IGM init={init}: %{{y:.3g}}<extra></extra>"), 1, 2)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.25, x=0.55),
                      title=dict(text=f"Per-block difficulty on {st.profile.meta.get('n', '?')} calibration "
                                      f"images — forward block index; sampling runs block {B - 1} first (step 0)",
                                 font=dict(size=14)))
    fig.update_yaxes(title_text="CRM share (%)", row=1, col=1)
    fig.update_yaxes(title_text="IGM (spectral norm)", row=1, col=2)
    return fig_html(fig, 450, top=95)


INIT_DASH = {"zeros": "solid", "z": "dot", "calibrated": "dash"}  # a profile's curves per initial guess
INIT_WORDS = {"zeros": "solid", "z": "dotted", "calibrated": "dashed"}


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
        variants = [(S, init, INIT_DASH[init], 0) for S in seg_counts for init in INIT_DASH]
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
                      title=dict(text="Measured GS-Jacobi convergence per block (forward block index): S segments, "
                                      + ", ".join(f"{d} = {i} init" for i, d in INIT_WORDS.items() if i in set(curves.init))
                                      + ", dash-dot = Anderson", font=dict(size=14)))
    return fig_html(fig, 380 * rows + 80)
