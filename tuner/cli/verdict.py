"""What a finished tune says: the winner, what each figure means, and where it holds."""

from __future__ import annotations

from pathlib import Path


def tune_lines(summary, out: Path) -> list[str]:
    """What a finished tune says: the winner, what each figure means, and where it holds."""
    p = summary.schedule["provenance"]
    fs, fv = p["fid_search"], p["fid_verify"]
    dev, B, blocks = p["device_class"], summary.batch, summary.model["arch"]["num_blocks"]
    fid = (f"FID gap {fv['gap']:+.3g} ({fv['extractor']}, n={fv['n']}; tolerance {summary.tolerance:g}, "
           f"noise floor ± {fs['noise_floor_std']:.3g} at n={fs['n']})")
    latency = (f"{p['latency_s'] * 1e3:.1f} ms per batch of {B} on {dev} = {p['speedup_vs_sequential']:.2f}x "
               "sequential (re-timed here, interleaved)")
    if p.get("objective") == "passes":
        seq = summary.sequential_passes
        lines = [f"tuned schedule -> {out}/schedule.json: {p['passes_per_batch']:.0f} serial transformer passes "
                 f"per batch of {B} vs {seq} sequential ({seq / p['passes_per_batch']:.1f}x fewer; the one-pass "
                 f"lower bound is {blocks}); {fid}",
                 "what it means: where a pass costs about the same whatever it processes (a GPU at small batch) "
                 "latency falls about as passes do. It does not hold on this device: "
                 f"{latency}, because it pays for all the tokens each pass processes. Re-time it where it runs: "
                 "tarflow-tuner bench"]
    elif str(p.get("objective")).startswith("cost:"):
        lines = [f"tuned schedule -> {out}/schedule.json: {p['objective_value'] * 1e3:.1f} ms per batch of {B} "
                 f"modelled on {p['objective_device']} (device profile {p['objective'][5:]}); {fid}",
                 f"what it means: the search priced each pass with times measured on {p['objective_device']}; "
                 f"here it runs {latency}. Re-time it on the modelled device: tarflow-tuner bench"]
    else:
        lines = [f"tuned schedule -> {out}/schedule.json: {latency}; {fid}"]
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
