"""The report's tables: schedules compared (overall and per block), fastest trials, profile."""

from __future__ import annotations

from .html import _seed_name, _truthy, completed, esc, fid_tag, ms, note, num, table, trial_state
from .study import StudyFolder

SEED_ORDER = ("sequential", "jacobi", "jacobi1", "paper", "sejd")
SEED_TITLES = {"sequential": "sequential (exact reference)", "jacobi": "uniform Jacobi",
               "jacobi1": "one-segment Jacobi",
               "paper": "paper heuristic (CRM/IGM)", "sejd": "SeJD rule"}


def format_plan(p: dict, T: int) -> str:
    if p.get("mode") == "frontier":
        tol = f", tol {p['tol']:g}" if p.get("tol") else ""
        return f"frontier W={p['window']}, {p['init']}{tol}"
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
    """Chosen schedule first, then the seed schedules, each with what the search measured and
    (separately) its re-timed latency."""
    s = st.summary
    rows_by_trial = {int(r["number"]): r for r in st.trials.to_dict("records")} if st.trials is not None else {}
    out = []
    if st.schedule is not None:
        r = rows_by_trial.get(s.chosen_trial, {})
        prov = st.schedule.provenance
        seed = _seed_name(r) if r else ""
        out.append({"name": f"<b>chosen</b>: {esc(st.schedule.name)}" + (f" (= {esc(seed)} seed)" if seed else ""),
                    "key": "chosen", "trial": s.chosen_trial, "status": "feasible, verified",
                    "latency_s": prov["latency_search_s"], "fid": prov["fid_search"]["fid"],
                    "fid_gap": prov["fid_search"]["gap"], "proxy": prov["proxy"], "iters": s.chosen_iters,
                    "plans": st.schedule.to_dict()["blocks"]})
    by_seed = {_seed_name(r): r for r in rows_by_trial.values() if _seed_name(r)}
    for name in list(SEED_ORDER) + [k for k in s.seeds if k not in SEED_ORDER]:
        rec, r = s.seeds.get(name), by_seed.get(name)
        title = esc(SEED_TITLES.get(name, name))
        if rec is not None:
            out.append({"name": title, "key": name, "trial": rec.trial,
                        "status": "feasible" if rec.feasible else "infeasible (over tolerance)",
                        "latency_s": rec.latency_s, "fid": rec.fid, "fid_gap": rec.fid_gap,
                        "proxy": rec.proxy, "iters": rec.iters, "plans": rec.schedule})
        elif r is not None:
            kind = trial_state(r)
            status = (f"pruned at warm-up (pixel RMSE {num(r.get('warmup_rmse'), '.3g')} of 255)"
                      if kind == "pruned" else kind)
            done = kind in ("feasible", "infeasible")
            out.append({"name": title, "key": name, "trial": r.get("number"), "status": status,
                        "latency_s": r.get("latency_s") if done else None,
                        "fid": r.get("fid") if done else None, "fid_gap": r.get("fid_gap") if done else None,
                        "proxy": {"rmse_mean": r.get("proxy_rmse_mean"), "rmse_max": r.get("proxy_rmse_max")}
                        if done else {}, "iters": None, "plans": st.space.plans_from_row(r)})
    for row in out:  # the interleaved re-timing at the end of the search, where there was one
        row["final_s"] = (s.final_latency.get(row["key"]) or {}).get("median_s")
    return out


def comparison_tables(st: StudyFolder, seq_latency: float | None) -> str:
    rows = comparison_rows(st)
    if not rows:
        return note("No schedules to compare (summary.json lists no seed trials).")
    ext, n = st.search_fid
    T, B = st.T, st.B
    head = ["schedule", "trial", "status", f"latency (ms / batch of {st.summary.batch})",
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
        f"Measured in the search on the same noise (batch {st.summary.batch}, "
        f"{esc(st.summary.device['device_class'])}); speed-up = sequential "
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
