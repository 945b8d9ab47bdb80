"""The report's tables: schedules compared (overall and per block), fastest trials, profile."""

from __future__ import annotations

from tuner.search.accounting import STAGE_TITLES, fmt_count

from .html import _seed_name, _truthy, completed, esc, fid_tag, ms, note, num, table, trial_state
from .study import StudyFolder, profile_inits

SEED_ORDER = ("sequential", "jacobi", "jacobi1", "paper", "sejd", "model")
SEED_TITLES = {"sequential": "sequential (exact reference)", "jacobi": "uniform Jacobi",
               "jacobi1": "one-segment Jacobi",
               "paper": "paper heuristic (CRM/IGM)", "sejd": "SeJD rule",
               "model": "drift model (per-block tolerances)"}


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
    """Chosen schedule first, then the seed schedules, each with what the search measured: its
    objective value (the objective's unit), the latency timed while it ran and (separately) its
    re-timed latency. The chosen trial's figures come from the summary, never from the schedule's
    provenance (schedules written before summary version 2 stored the objective value as a
    latency)."""
    s = st.summary
    rows_by_trial = {int(r["number"]): r for r in st.trials.to_dict("records")} if st.trials is not None else {}
    out = []
    if st.schedule is not None:
        r = rows_by_trial.get(s.chosen_trial, {})
        prov = st.schedule.provenance
        seed = _seed_name(r) if r else ""
        out.append({"name": f"<b>chosen</b>: {esc(st.schedule.name)}" + (f" (= {esc(seed)} seed)" if seed else ""),
                    "key": "chosen", "trial": s.chosen_trial, "status": "feasible, verified",
                    "value": s.chosen_value, "latency_s": s.chosen_latency_s, "fid": prov["fid_search"]["fid"],
                    "fid_gap": prov["fid_search"]["gap"], "proxy": prov["proxy"], "iters": s.chosen_iters,
                    "plans": st.schedule.to_dict()["blocks"]})
    by_seed = {_seed_name(r): r for r in rows_by_trial.values() if _seed_name(r)}
    for name in list(SEED_ORDER) + [k for k in s.seeds if k not in SEED_ORDER]:
        rec, r = s.seeds.get(name), by_seed.get(name)
        title = esc(SEED_TITLES.get(name, name))
        if rec is not None:
            out.append({"name": title, "key": name, "trial": rec.trial,
                        "status": "feasible" if rec.feasible else "infeasible (over tolerance)",
                        "value": rec.objective_value, "latency_s": rec.latency_s, "fid": rec.fid,
                        "fid_gap": rec.fid_gap, "proxy": rec.proxy, "iters": rec.iters, "plans": rec.schedule})
        elif r is not None:
            out.append(_trial_row(st, name, title, r))
    for row in out:  # the interleaved re-timing at the end of the search, where there was one
        row["final_s"] = (s.final_latency.get(row["key"]) or {}).get("median_s")
    return out


def pruned_reason(r: dict) -> str:
    """Why a pruned trial stopped: the reason trials.csv recorded (`fail_reason`), else (studies
    from before reasons were recorded) the warm-up screen's figure."""
    why = r.get("fail_reason")
    if isinstance(why, str) and why:
        return why.removeprefix("pruned: ")
    return f"at warm-up (pixel RMSE {num(r.get('warmup_rmse'), '.3g')} of 255)"


def _trial_row(st: StudyFolder, name: str, title: str, r: dict) -> dict:
    """A seed the summary does not list (pruned, failed) as trials.csv recorded it."""
    kind = trial_state(r)
    status = f"pruned: {pruned_reason(r)}" if kind == "pruned" else kind  # escaped where it is shown
    done = kind in ("feasible", "infeasible")
    return {"name": title, "key": name, "trial": r.get("number"), "status": status,
            "value": r.get("objective") if done else None, "latency_s": r.get("latency_s") if done else None,
            "fid": r.get("fid") if done else None, "fid_gap": r.get("fid_gap") if done else None,
            "proxy": {"rmse_mean": r.get("proxy_rmse_mean"), "rmse_max": r.get("proxy_rmse_max")} if done else {},
            "iters": None, "plans": st.space.plans_from_row(r)}


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def comparison_tables(st: StudyFolder) -> str:
    rows = comparison_rows(st)
    if not rows:
        return note("No schedules to compare (summary.json lists no seed trials).")
    return _overall_table(st, rows) + prediction_table(st) + _per_block_table(st, rows)


def prediction_table(st: StudyFolder) -> str:
    """The model seed's prediction beside what its trial measured (trials.csv's predicted_*
    columns; empty for studies without a model seed)."""
    t = st.trials
    if t is None or "predicted_drift" not in t or not (t.seed == "model").any():
        return ""
    r = t[t.seed == "model"].iloc[0].to_dict()
    done = trial_state(r) in ("feasible", "infeasible")
    drift, passes = r.get("proxy_rmse_max") if done else None, r.get("objective") if done else None
    ratio = "–" if not drift or not r["predicted_drift"] else f"{drift / r['predicted_drift']:.2f}×"
    n = st.search_fid[1]
    passes_shown = passes if st.goal.kind == "passes" else None
    return table(["model seed (trial)", "predicted worst drift (0–255)", "measured worst drift", "measured / predicted",
                  "predicted passes / batch", "measured passes / batch"],
                 [[esc(r.get("number")), num(r["predicted_drift"], ".3g"), num(drift, ".3g"), ratio,
                   num(r["predicted_passes"], ".0f"), num(passes_shown, ".1f")]], cls="compare",
                 caption=("The drift model's prediction for its seed: per block the drift and passes of one calibration "
                          "batch solved at the block's tolerance with every other block exact, combined as a "
                          "root-sum-square per sample (tuner.search.drift_model); measured: the seed trial over "
                          f"the search's {n} samples ({trial_state(r)}). One batch does not see the search's tail, "
                          "so measured / predicted above 1 is expected."))


def _overall_table(st: StudyFolder, rows: list[dict]) -> str:
    """One row per schedule: the objective in its own unit, measured latencies apart."""
    goal, b, s = st.goal, st.summary.batch, st.summary
    ext, n = st.search_fid
    seq = s.sequential_value
    seq_final = next((q["final_s"] for q in rows if q["key"] == "sequential"), None)
    timed = [] if goal.measured else [f"latency in the search (ms / batch of {b})"]
    head = ["schedule", "trial", "status", esc(goal.title(b)), esc(goal.gain), *timed,
            "re-timed latency (ms)", "re-timed speed-up", f"FID ({esc(fid_tag(ext, n))})", "FID gap",
            "paired proxy RMSE mean / max (0–255)", "transformer passes per batch"]
    body = []
    for r in rows:
        px = r["proxy"] or {}
        passes = sum(sum(i) for i in r["iters"]) if r["iters"] else None
        body.append([r["name"], esc(r["trial"] if r["trial"] is not None else "–"), esc(r["status"]),
                     goal.number(r["value"]), _ratio(goal.ratio(seq, r["value"])),
                     *([] if goal.measured else [ms(r["latency_s"])]),
                     ms(r["final_s"]), _ratio(seq_final / r["final_s"] if seq_final and r["final_s"] else None),
                     num(r["fid"], ".4g"), num(r["fid_gap"], "+.3g"),
                     f"{num(px.get('rmse_mean'), '.3g')} / {num(px.get('rmse_max'), '.3g')}",
                     esc(passes if passes is not None else "–")])
    title = goal.title(b)
    what = (f"{esc(title[:1].upper() + title[1:])}: what the search minimised (stored in {esc(goal.unit)}); "
            f"{esc(goal.gain)} = sequential's {esc(goal.format(seq))} / the schedule's.")
    if not goal.measured:
        what += (f" Latency in the search: timed on {esc(s.device['device_class'])} while each trial ran "
                 "(not what the search minimised).")
    return table(head, body, cls="compare", row_cls=["chosen" if r["key"] == "chosen" else "" for r in rows],
                 caption=(f"Measured in the search on the same noise (batch {b}, "
                          f"{esc(s.device['device_class'])}). {what} Re-timed: the same schedules timed again, "
                          "interleaved, after the search (the latencies the summary and the schedule file "
                          f"quote). FID and gap: {esc(fid_tag(ext, n))}."))


def _per_block_table(st: StudyFolder, rows: list[dict]) -> str:
    """Each schedule's plan per block, in sampling order, with the passes it used."""
    T, B = st.T, st.B
    body = []
    for i in range(B):
        k = B - 1 - i
        cells = [str(i), str(k)]
        for r in rows:
            p = next((q for q in r["plans"] or [] if int(q["block"]) == k), None)
            used = r["iters"][i] if r["iters"] and i < len(r["iters"]) else None
            if p is None:
                cells.append("–")
            else:
                cells.append(("<b>" if r["key"] == "chosen" else "") + f"{esc(format_plan(p, T))}<br><span "
                             f"class='dim'>passes used: {esc(format_used(used))}</span>")
        body.append(cells)
    return table(["sampling step", "forward block"] + [r["name"] for r in rows], body, cls="compare", caption=(
        f"Plan per block in <b>sampling order</b> (step 0 = forward block {B - 1}, run first): "
        f"S segments × at most that many Jacobi passes each, initial guess, early-stop tol; "
        f"“passes used” = transformer passes actually run per block on the first search batch "
        f"(T={T} tokens; token by token = {max(T - 1, 0)} passes)."))


def top_trials_table(st: StudyFolder, chosen: int | None, k: int = 12) -> str:
    """The best completed trials in the objective, feasible or not, with their FID gap."""
    goal = st.goal
    df = completed(st.trials).sort_values("objective").head(k)
    ext, n = st.search_fid
    rows, cls = [], []
    for r in df.to_dict("records"):
        rows.append([esc(r["number"]), esc(_seed_name(r) or "–"), goal.number(r["objective"]),
                     *([] if goal.measured else [ms(r.get("latency_s"))]), num(r.get("fid_gap"), "+.3g"),
                     "yes" if _truthy(r.get("feasible")) else "<span style='color:#d1495b'>no</span>",
                     num(r.get("proxy_rmse_mean"), ".3g"), esc(num(r.get("passes"), ".0f"))])
        cls.append("chosen" if chosen is not None and int(r["number"]) == chosen else "")
    head = ["trial", "seed", esc(goal.title()), *([] if goal.measured else ["latency in the search (ms)"]),
            f"FID gap ({esc(fid_tag(ext, n))})", "feasible", "mean drift, pixel RMSE (0–255)", "passes (all search batches)"]
    return (f'<div class="tablebox"><h3>Best completed trials by {esc(goal.label)}</h3>'
            + table(head, rows, cls="compare", row_cls=cls,
                    caption="Highlighted: the chosen trial.") + "</div>")


def profile_table(st: StudyFolder) -> str:
    prof = st.profile.blocks.sort_values("block")
    inits, rows = profile_inits(prof), []
    for r in prof.to_dict("records"):
        k = int(r["block"])
        need = [st.profile.iters_needed(k, 1, init, 1e-3) for init in inits]
        rows.append([str(k), str(int(r["sampling_step"])), num(r.get("crm"), ".3g"), num(r.get("crm_share"), ".1f"),
                     *(num(r.get(f"igm_{i}"), ".3g") for i in inits), esc(r.get("best_init", "")),
                     " / ".join(str(x) for x in need)])
    return table(["forward block", "sampling step", "CRM", "CRM share (%)", *(f"IGM {esc(i)}" for i in inits),
                  "best init", f"passes to 1e-3, one segment ({' / '.join(map(esc, inits))})"], rows, cls="compare",
                 caption="Rows in <b>forward</b> block order; sampling step 0 runs first. Best init: the "
                         "lowest IGM among the guesses that need no fitted numbers.")


def cost_table(st: StudyFolder) -> str:
    """What the tune spent sampling, per stage (summary.json's `cost`, tuner.search.accounting),
    beside what it announced before its first trial."""
    cost, b = st.summary.cost, st.summary.batch
    if cost is None:
        return note("What this tune spent sampling was not recorded (its summary predates cost accounting).")
    est = {k: v.passes for k, v in (cost.estimate or {}).items()}
    est["total"] = sum(est.values()) if est else None
    rows = []
    for k, v in [*cost.stages.items(), ("total", cost.total)]:
        e = est.get(k)
        rows.append([("<b>total</b>" if k == "total" else esc(STAGE_TITLES.get(k, k))), esc(fmt_count(v.passes)),
                     num(v.sequential_batches, ",.1f"), esc(fmt_count(v.tokens)), num(v.seconds, ",.0f"),
                     "–" if e is None else esc("~" + fmt_count(e))])
    early = (f" {cost.stopped_early} trial(s) stopped early (pruned part-way: warm-up screen or drift limit "
             f"already broken) and spent {esc(fmt_count(cost.stopped_early_passes))} passes of the search's."
             if cost.stopped_early else "")
    missing = f" {cost.unrecorded} older trial(s) have no record and are not counted." if cost.unrecorded else ""
    return ('<h3>What the tune cost</h3>' + table(
        ["stage", "serial passes", f"sequential batches of {b}", "tokens", "wall seconds", "announced (passes)"],
        rows, cls="compare", caption=(
            f"Counted by the sampler: serial transformer passes and tokens (per sequence of a batch), summed over "
            f"every batch sampled; a sequential batch = B(T−1) = {st.B * (st.T - 1)} passes. The search sums its "
            f"{cost.trials} trials' own records; the other stages ran once, on the worker that exported. Wall "
            "seconds include FID features. Announced: the estimate printed before the first trial." + early
            + missing)))
