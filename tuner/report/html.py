"""Small HTML and formatting helpers shared by the report's sections (cells arrive escaped)."""

from __future__ import annotations

import base64
import html
import math

PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "toImageButtonOptions": {"format": "png", "scale": 2}}
STATE_COLORS = {"feasible": "#1b9e5a", "infeasible": "#d1495b", "pruned": "#8d939a", "failed": "#3b3b3b"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")



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


def completed(trials):
    return trials[trials.state == "COMPLETE"].copy()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_box(div: str) -> str:
    return div if div.startswith("<div class=\"note\"") else f'<div class="plot">{div}</div>'
