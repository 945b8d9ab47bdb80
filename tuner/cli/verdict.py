"""What a finished tune says: the winner, what each figure means, and where it holds."""

from __future__ import annotations

from pathlib import Path


def tune_lines(summary, out: Path) -> list[str]:
    """What a finished tune says: the winner in the objective's own unit (tuner.search.objectives
    words it), what that means where it was re-timed, and the re-timed speed-ups."""
    p, goal = summary.schedule["provenance"], summary.goal
    fs, fv = p["fid_search"], p["fid_verify"]
    dev, B, blocks = p["device_class"], summary.batch, summary.model["arch"]["num_blocks"]
    fid = (f"FID gap {fv['gap']:+.3g} ({fv['extractor']}, n={fv['n']}; tolerance {summary.tolerance:g}, "
           f"noise floor ± {fs['noise_floor_std']:.3g} at n={fs['n']})")
    latency = (f"{p['latency_s'] * 1e3:.1f} ms per batch of {B} on {dev} = {p['speedup_vs_sequential']:.2f}x "
               "sequential (re-timed here, interleaved)")
    if goal.measured:  # the objective is latency here: quote the fairer re-timing
        lines = [f"tuned schedule -> {out}/schedule.json: {latency}; {fid}"]
    else:
        head = goal.headline(summary.chosen_value, summary.sequential_value, B, blocks)
        lines = [f"tuned schedule -> {out}/schedule.json: {head}; {fid}", f"what it means: {goal.meaning(latency)}"]
    lines.append("speed-up vs seeds (re-timed here): "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in p["speedup_vs_seeds"].items()))
    if p["equivalent_to_sequential"]:
        lines.append(f"note: every block of the winner is token-by-token: on {dev} at batch {B} nothing beat "
                     "the sequential sampler; any speed-up above is timing noise")
    return lines


def nothing_exported_line(summary, out: Path) -> str:
    """Why a tune exported nothing, and what an earlier export left in `out` means."""
    kept = (f"; {out}/schedule.json is an earlier export of this study, left as it was"
            if (out / "schedule.json").exists() else "")
    drift = " and the drift limit" if summary.config.get("max_drift") is not None else ""
    return (f"no schedule met FID tolerance {summary.tolerance:g}{drift} on fresh noise ({summary.trials} "
            f"trials); nothing exported (see {out}/trials.csv){kept}")


def cost_lines(summary) -> list[str]:
    """What the tune itself spent sampling (summary.cost, tuner.search.accounting), against what it
    announced before its first trial; nothing for summaries written before costs were recorded."""
    from tuner.search.accounting import STAGE_TITLES, fmt_count

    cost = summary.cost
    if cost is None:
        return []
    tot, s = cost.total, cost.stages
    parts = [f"{STAGE_TITLES[k].split(' (')[0]} {fmt_count(v.passes)}" for k, v in s.items()]
    parts[0] += f" ({cost.trials} trials" + (
        f", {cost.stopped_early} stopped early for {fmt_count(cost.stopped_early_passes)}" if cost.stopped_early
        else "") + (f"; {cost.unrecorded} older trials unrecorded" if cost.unrecorded else "") + ")"
    seq = f" = {tot.sequential_batches:,.0f} sequential batches of {summary.batch}" if tot.sequential_batches else ""
    lines = [f"this tune cost {fmt_count(tot.passes)} serial passes{seq}, {fmt_count(tot.tokens)} tokens, "
             f"{tot.seconds / 60:.1f} min sampling and scoring: {', '.join(parts)}"]
    if cost.estimate:
        est = sum(v.passes for v in cost.estimate.values())
        lines.append(f"  (announced before the first trial: ~{fmt_count(est)} passes)")
    return lines
