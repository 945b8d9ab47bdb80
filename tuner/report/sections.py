"""The report page: one function per section, each from the typed study to an HTML fragment."""

from __future__ import annotations

import math
import time

from .figures import convergence_figure, profile_bars
from .search_figures import history_figure, importance_figure, parallel_figure, scatter_figure
from .html import data_uri, esc, fid_tag, ms, note, num, plot_box
from .study import StudyFolder, display_path
from .tables import comparison_tables, cost_table, profile_table, top_trials_table


def _settings_text(st: StudyFolder) -> str:
    s = st.summary.sampling
    g = "no guidance" if not s.guided else (
        f"guidance {s.guidance:g}" + (" annealed" if s.guidance_anneal else "")
        + (f", unconditional attention temperature {s.attn_temp:g}" if s.attn_temp != 1 else ""))
    d = f"denoising step (noise std {s.denoise_std:g})" if s.denoise_std > 0 else "no denoising step"
    return f"labels {s.labels}, {g}, {d}, {s.dtype}"


def _cards(st: StudyFolder) -> str:
    s, sched = st.summary, st.schedule
    ext, n = st.search_fid
    floor, std = s.noise_floor, s.noise_floor.get("std")
    cards = []
    if sched is not None:
        prov = sched.provenance
        fs, fv = prov["fid_search"], prov.get("fid_verify") or {}
        if not st.goal.measured:  # the search's own measure first
            cards.append(_objective_card(st))
        if fv.get("proxy"):
            cards.append(("drift vs sequential, re-verified", f"{num(fv['proxy']['rmse_max'], '.3g')}/255 max",
                          f"mean {num(fv['proxy']['rmse_mean'], '.3g')}/255 over {fv['proxy']['n']} fresh samples"
                          + (f"; limit {prov['max_drift']:g}" if prov.get("max_drift") is not None else "")))
        cards.append(("speed-up vs sequential (re-timed)", f"{num(prov['speedup_vs_sequential'], '.2f')}×",
                      f"{ms(prov['latency_s'])} ms vs {ms(prov['sequential_latency_s'])} ms per batch of "
                      f"{s.batch} on {esc(s.device['device_class'])}"))
        if fv:
            cards.append(("FID gap, re-verified", f"{num(fv.get('gap'), '+.3g')} ± {num(std, '.3g')}",
                          f"FID {num(fv.get('fid'))} vs sequential {num(fv.get('fid_sequential'))} "
                          f"({esc(fid_tag(fv.get('extractor', '?'), fv.get('n', '?')))}, fresh noise); "
                          f"± = noise-floor std ({esc(fid_tag(floor.get('extractor', ext), floor.get('n', n)))})"))
        cards.append(("FID gap in the search", f"{num(fs['gap'], '+.3g')} ± {num(std, '.3g')}",
                      f"FID {num(fs['fid'])} vs sequential {num(fs['sequential'])} "
                      f"({esc(fid_tag(fs['extractor'], fs['n']))})"))
    else:
        cards.append(("speed-up vs sequential", "none", "no schedule met the tolerance"))
    res = floor.get("resolution") or (2 * math.sqrt(2) * std if std else None)
    cards.append(("tolerance", f"+{s.tolerance:g} FID",
                  f"noise floor {num(floor.get('mean'))} ± {num(std, '.3g')} over {len(floor.get('values', []))} "
                  f"seeds ({esc(fid_tag(floor.get('extractor', ext), floor.get('n', n)))}); resolution 2√2·std = {num(res, '.3g')}"))
    cards.append(("trials", f"{s.trials}", f"{s.feasible} feasible; search {num(s.search_seconds, '.0f')} s"
                  + (f"; chosen trial {s.chosen_trial}" if s.chosen_trial is not None else "")))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div><div class="d">{d}</div></div>'
        for k, v, d in cards) + "</div>"


def _objective_card(st: StudyFolder) -> tuple[str, str, str]:
    """What the search minimised, in its unit, against sequential (from the summary: old
    schedule files stored a pass count where a latency belonged)."""
    s, goal = st.summary, st.goal
    seq, value = s.sequential_value, s.chosen_value
    ratio = goal.ratio(seq, value)
    device = goal.device_name(s.device["device_name"])
    return (goal.title(s.batch), esc(goal.format(value)),
            f"vs {esc(goal.format(seq))} sequential" + (f" ({ratio:.2f}× {esc(goal.gain)})" if ratio else "")
            + f"; objective <code>{esc(goal.spec)}</code>" + (f" on {esc(device)}" if device else ""))


def summary_section(st: StudyFolder, checkpoint_shown: str) -> str:
    s, a = st.summary, st.arch
    ext, n = st.search_fid
    parts = ['<h2 id="summary">Summary</h2>']
    if st.schedule is None:
        parts.append(note(f"No schedule was exported: no schedule faster than sequential met the FID "
                          f"tolerance +{s.tolerance:g} ({esc(fid_tag(ext, n))}) in {s.trials} trials. "
                          "The profile and the search below show what was tried.", "alert"))
    if s.tolerance_warning:
        parts.append(note("Tolerance warning: " + esc(s.tolerance_warning), "warn"))
    parts += [note(esc(t)) for t in st.notes]
    parts.append(_cards(st))
    arch_txt = (f"{a['num_blocks']} blocks × {a['layers_per_block']} layers, width {a['channels']}, head dim "
                f"{a['head_dim']}, {a['img_size']}² × {a['in_channels']} image, patch {a['patch_size']} → T={st.T} "
                f"tokens, {a['num_classes'] or 'no'} classes, {'affine' if a.get('nvp', True) else 'shift-only'}")
    sha = str(s.model["weights_sha256"])
    verify = (st.schedule.provenance.get("fid_verify") or {}) if st.schedule is not None else {}
    kv = [("model", esc(arch_txt)),
          ("fingerprint", f"<code title='{esc(sha)}'>sha256 {esc(sha[:16])}…</code>"),
          ("checkpoint", f"<code>{esc(checkpoint_shown)}</code>"),
          ("device", esc(f"{s.device['device_class']} — {s.device['device_name']}, torch {s.device['torch']}")),
          ("batch", esc(f"{s.batch} (latency = median over timed batches of this size)")),
          ("sampling settings", esc(_settings_text(st) + " — every trial, baseline and verification sampled so")),
          ("tolerance", esc(f"FID may rise by at most {s.tolerance:g} over sequential on the same noise")),
          ("FID in the search", esc(f"{fid_tag(ext, n)}; sequential FID {num(s.sequential.fid)}")),
          ("FID re-verification", esc(fid_tag(verify.get("extractor") or s.config.get("verify_extractor", "?"),
                                              s.config.get("verify_n", "?"))
                                      + " on fresh noise, for the fastest feasible candidates")),
          ("study", esc(f"Optuna study '{s.study}' in study.db, seed {s.config.get('seed', '?')}"))]
    parts.append('<table class="kv">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv) + "</table>")
    return "".join(parts)


def profile_section(st: StudyFolder) -> str:
    parts = ['<h2 id="profile">Profile</h2>']
    if st.profile is None:
        return parts[0] + note("No profile in this study folder (profile/profile.json missing).")
    meta = st.profile.meta
    parts.append(f'<p class="sub">Measured on {esc(meta.get("n", "?"))} calibration images '
                 f'({esc(meta.get("labels", ""))}; curves on {esc(meta.get("curve_n", "?"))}). '
                 f'Block numbers are <b>forward</b> indices; sampling runs block {st.B - 1} first '
                 f'(sampling step 0) and block 0 last.</p>')
    parts += [plot_box(profile_bars(st)), plot_box(convergence_figure(st))]
    parts.append(f'<p class="dim">S={st.T} (token by token) is exact after one pass per token and is not drawn. '
                 'Error = max over tokens, channels, images and segments of |x − x*| after each pass; '
                 'zero errors are not drawn on the log axis.</p>')
    parts.append(profile_table(st))
    return "".join(parts)


def search_section(st: StudyFolder) -> str:
    head = '<h2 id="search">Search</h2>'
    if st.trials is None or st.trials.empty:
        return head + note("No trials.csv: the search history is not available.")
    chosen = st.summary.chosen_trial
    ext, n = st.search_fid
    return (head + '<div class="row2">' + plot_box(history_figure(st, chosen))
            + plot_box(scatter_figure(st, chosen)) + "</div>"
            + '<div class="row2">' + plot_box(importance_figure(st)) + top_trials_table(st, chosen) + "</div>"
            + plot_box(parallel_figure(st))
            + f'<p class="dim">Constraint: FID gap ({esc(fid_tag(ext, n))}) − tolerance ≤ 0. Pruned '
            'trials stopped part-way, each for the reason trials.csv records: the warm-up batch\'s pixel '
            'RMSE to the sequential samples was hopeless, or a sample already drifted past the drift limit '
            f'(more batches could only raise the max); they count as infeasible and have no {esc(st.goal.label)}.</p>'
            + cost_table(st))


def schedules_section(st: StudyFolder) -> str:
    parts = ['<h2 id="schedules">Schedules compared</h2>']
    if st.schedule is None:
        parts.append(note("No schedule was exported; the seed schedules the search started from:", "warn"))
    parts.append(comparison_tables(st) if st.trials is not None
                 else note("trials.csv is missing: no comparison."))
    if st.schedule is not None and st.schedule.provenance.get("speedup_vs_seeds"):
        parts.append('<p class="dim">Chosen schedule speed-up over each seed (re-timed seed latency / chosen '
                     'latency): ' + esc(", ".join(f"{k} {v:.2f}×" for k, v in
                                                  st.schedule.provenance["speedup_vs_seeds"].items())) + "</p>")
    return "".join(parts)


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f'<figure><img alt="{esc(alt)}" src="{data_uri(png)}"><figcaption>{caption}</figcaption></figure>'


def samples_section(st: StudyFolder) -> str:
    head = '<h2 id="samples">Samples</h2>'
    pics = st.pictures
    if pics is None:
        return head + note("No pictures in this study folder (pictures/ is written by `tune`).")
    info, sc = pics.info, pics.schedule
    figs = [_figure(pics.png["sequential.png"], "sequential samples",
                    f"<b>sequential</b> (exact), {info['sequential_passes']} transformer passes")]
    extra = ""
    if sc is not None:
        same = " — identical images" if sc["max_diff"] == 0 else ""
        figs += [_figure(pics.png["schedule.png"], "chosen schedule samples",
                         f"<b>chosen schedule</b> ({esc(sc['name'])}), {sc['passes']} transformer passes"),
                 _figure(pics.png["diff.png"], "amplified difference",
                         f"<b>|Δ| × {sc['gain']:g}</b> (black = equal){same}; max |Δ| = {sc['max_diff']:.3g} "
                         f"of 255, pixel RMSE {sc['rmse']:.3g} of 255")]
        drift = sorted(sc["drift"])
        q = lambda f: drift[min(len(drift) - 1, int(f * len(drift)))]  # noqa: E731
        extra = ('<div class="pics">' + _figure(pics.png["worst.png"], "worst sample",
                 f"<b>worst sample</b> (image {sc['worst']}): sequential (left) and chosen schedule (right)")
                 + f'<p class="dim">Per-sample pixel drift (RMSE, 0–255) of the chosen schedule against the '
                 f'sequential sample: median {q(0.5):.3g}, 90th percentile {q(0.9):.3g}, max {drift[-1]:.3g} '
                 f'over {len(drift)} images.</p></div>')
    s = st.summary.sampling
    return (head + '<div class="pics">' + "".join(figs) + "</div>" + extra
            + f'<p class="dim">{info["n"]} images from the same noise (seed {info["seed"]}, '
            f'<code>make_noise</code>); {esc(_settings_text(st))}; labels by the policy "{esc(s.labels)}". '
            'Sampled by <code>tune</code> when the study was written.</p>'
            + ("" if sc is not None else note("No chosen schedule: only the sequential sampler is shown.")))


def usage_section(st: StudyFolder, checkpoint_shown: str) -> str:
    parts = ['<h2 id="usage">How to use this schedule</h2>']
    s = st.summary
    sched_path = f"{display_path(st.path)}/schedule.json"
    if st.schedule is None:
        return parts[0] + note("Nothing to use: no schedule was exported. Try a larger tolerance, more trials "
                               "or a larger --n (see the tolerance warning above).")
    parts.append(f"<pre><code>tarflow-tuner sample --checkpoint {esc(checkpoint_shown)} \\\n"
                 f"    --schedule {esc(sched_path)} --n {s.batch} --device {esc(s.device['device_class'])} "
                 "--out samples</code></pre>")
    parts.append(f"<pre><code>from tarflow.checkpoint import load_checkpoint\n"
                 f"from tarflow.sampling import make_noise, sample\n"
                 f"from tarflow.schedule import resolve_schedule\n\n"
                 f"model = load_checkpoint({esc(repr(checkpoint_shown))})\n"
                 f"schedule = resolve_schedule({esc(repr(sched_path))}, model)  # checks the fingerprint\n"
                 f"settings = schedule.sampling  # guidance, denoising, labels it was tuned with\n"
                 f"noise = make_noise({s.batch}, model, seed=0)\n"
                 f"x, stats = sample(model, noise, schedule, labels=settings.make_labels({s.batch}, model), "
                 f"settings=settings)  # x: model space [-1, 1]</code></pre>")
    parts.append(f'<p class="dim">Tuned for batch {s.batch} on {esc(s.device["device_class"])} with '
                 f'{esc(_settings_text(st))}; another device, batch size or setting runs correctly but may '
                 'not be the fastest choice there. The schedule refuses to run on a model with other '
                 'weights unless <code>--force</code> is given.</p>')
    return "".join(parts)


def build_html(st: StudyFolder, *, checkpoint_shown: str, plotly_js: str, css: str, version: str) -> str:
    study_shown = display_path(st.path)
    body = ["<h1>TarFlow GS-Jacobi schedule report</h1>",
            f'<p class="sub">study <code>{esc(study_shown)}</code> · model <code>{esc(checkpoint_shown)}</code> · '
            f'report written {esc(time.strftime("%Y-%m-%d %H:%M"))}</p>',
            '<nav><a href="#summary">Summary</a><a href="#profile">Profile</a><a href="#search">Search</a>'
            '<a href="#schedules">Schedules compared</a><a href="#samples">Samples</a>'
            '<a href="#usage">How to use</a></nav>',
            summary_section(st, checkpoint_shown), profile_section(st), search_section(st),
            schedules_section(st), samples_section(st), usage_section(st, checkpoint_shown),
            f"<footer>tarflow-tuner {esc(version)} report · self-contained: plotly.js and images are "
            "embedded, nothing is loaded from the network.</footer>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>TarFlow schedule report — {esc(study_shown)}</title>\n<style>{css}</style>\n"
            f"<script type=\"text/javascript\">{plotly_js}</script>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")
