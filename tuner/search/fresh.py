"""The verification noise as a check any schedule can be put to: fresh noise the search never
saw (seed + 1, verify_n samples), its sequential samples computed once per process, and a record
per trial kept in the study. The refinement asks it whether a candidate holds before it moves on
(tuner.search.refine); the final verification asks it again and gets the stored record back."""

from __future__ import annotations

import json
import time

import torch

from tarflow.sampling import make_noise, sample
from tarflow.schedule import builtin_schedule

from tuner.quality.paired import paired_proxy
from tuner.search.accounting import Spent
from tuner.search.config import TuneConfig
from tuner.search.evaluate import Evaluator


class FreshCheck:
    """The verification noise (seed + 1, verify_n samples) and its sequential samples, features
    and FID, computed once and shared by the refinement's checks and the final verification.

    `check` runs one schedule on it batch by batch and stops at the first batch where a sample
    drifts past the limit: at batch 1 and on the patch-2 model the drift tail is heavy (a
    schedule within the limit on the search samples drifted 2-3.9/255 on fresh noise), and a
    schedule that fails there needs no FID. With a `study`, records are kept in it (`key`), so a
    trial checked by the refinement is not sampled again by the final verification (nor by
    another worker, nor after --resume). `hardest` makes the refinement's cheaper screen."""

    def __init__(self, ev: Evaluator, cfg: TuneConfig, vext, vref, spent: Spent | None = None, study=None,
                 n: int | None = None, batches: list[int] | None = None, parent: "FreshCheck | None" = None,
                 tag: str = ""):
        self.ev, self.cfg, self.vext, self.vref, self.study = ev, cfg, vext, vref, study
        self.n = cfg.verify_n if n is None else n  # fresh samples of the noise (seed + 1)
        self.batches = batches  # the batches of it this check samples (None: all; a screen: some)
        self.parent, self.tag = parent, tag  # a screen shares its parent's sequential samples
        self.spent = Spent() if spent is None else spent  # what the checks sampled (tuner.search.accounting)
        self._seq = None

    def hardest(self, trial, k: int | None = None) -> "FreshCheck":
        """The refinement's screen for steps away from `trial` (checked here in full first): the
        cfg.screen_n / batch batches of the verification noise where `trial` drifted most, drift
        only. A looser step drifts most where the base already did: on the patch-2 model the
        samples that broke the limit under two looser steps (2.6-4.0/255) were all among the 64
        the base drifted most on, and none was among the first 256, the screen used before, which
        passed six steps that then failed on all 1,024. A batch here is the same batch as in the
        full check, so a sample over the limit on the screen is over it there too (`refused`).
        Returns self (the full check) when the base has no per-batch record or the screen would
        be all of it; `k`: batches to screen instead."""
        rec = self.of_trial(trial)
        worst, k = rec.get("batch_max"), k or -(-self.cfg.screen_n // self.cfg.batch)
        if not rec["ok"] or not worst or k >= len(worst):
            return self
        pick = sorted(sorted(range(len(worst)), key=lambda b: -worst[b])[:k])
        return FreshCheck(self.ev, self.cfg, self.vext, self.vref, self.spent, self.study, self.n, pick, self,
                          f"hard{k}-of-{trial.number}")

    def key(self, number: int) -> str:
        """The study user attribute holding trial `number`'s record (its noise and extractor named,
        and a screen's batches by the trial they were picked from)."""
        return f"fresh:{number}:{self.n}:{self.vext.id}" + (f":{self.tag}" if self.tag else "")

    def _sequential(self):
        if self.parent is not None:
            return self.parent._sequential()
        if self._seq is None:
            cfg, model, t0 = self.cfg, self.ev.model, time.perf_counter()
            noise = make_noise(self.n, model, cfg.seed + 1)
            labels = cfg.sampling.make_labels(self.n, model, cfg.seed + 1)
            x = self.ev.run(builtin_schedule("sequential", model), noise, labels, spent=self.spent).x
            feats, fid = self.ev.fid_of(x, self.vext, self.vref)
            self._seq = noise, labels, x, feats, fid
            self.spent.seconds += time.perf_counter() - t0
        return self._seq

    def check(self, sched) -> dict:
        """One schedule on the verification noise: the verification record plus `ok`, `why`,
        `batches` and `passes` (what the check sampled; fewer batches when it stopped early) and
        `batch_max` (each batch's worst sample); a screen checks the drift limit only."""
        cfg, ev, bs = self.cfg, self.ev, self.cfg.batch
        noise, labels, x_seq, f_seq, fid_seq = self._sequential()
        xs, passes, worst, t0 = [], 0, [], time.perf_counter()
        for b in self.batches if self.batches is not None else range(-(-len(noise) // bs)):
            i = b * bs
            lab = None if labels is None else labels[i:i + bs]
            x, st = sample(ev.model, noise[i:i + bs], sched, labels=lab, settings=cfg.sampling, solvers=ev.solvers)
            self.spent.add(st)
            xs.append(x.float().cpu())
            passes += st.passes
            worst.append(float(paired_proxy(xs[-1], x_seq[i:i + bs])["rmse_max"]))
            if cfg.max_drift is not None and worst[-1] > cfg.max_drift:
                self.spent.seconds += time.perf_counter() - t0
                return {"ok": False, "why": f"drifts {worst[-1]:.3g}/255 > {cfg.max_drift:g} on a sample",
                        "n": bs * len(xs), "batches": len(xs), "passes": passes, "extractor": self.vext.id,
                        "proxy": {"rmse_max": worst[-1]}, "batch_max": worst}
        if self.batches is not None:  # a screen: the drift limit held on its batches
            self.spent.seconds += time.perf_counter() - t0
            return {"ok": True, "why": "ok (screen: drift only)", "n": bs * len(xs), "batches": len(xs),
                    "passes": passes, "extractor": self.vext.id, "proxy": {"rmse_max": max(worst)}, "batch_max": worst}
        x = torch.cat(xs)
        feats, fid = ev.fid_of(x, self.vext, self.vref)
        proxy = paired_proxy(x, x_seq, self.vext, features_schedule=feats, features_sequential=f_seq)
        ok = fid - fid_seq <= cfg.tolerance
        self.spent.seconds += time.perf_counter() - t0
        return {"ok": ok, "why": "ok" if ok else "fails the FID tolerance", "fid": fid, "fid_sequential": fid_seq,
                "gap": fid - fid_seq, "extractor": self.vext.id, "n": self.n, "proxy": proxy,
                "batches": len(xs), "passes": passes, "batch_max": worst}

    def known(self, trial) -> bool | None:
        """Whether trial `trial` held on the verification noise, from its stored record only
        (None: not checked yet, or no study to keep records in)."""
        rec = None if self.study is None else self.study.user_attrs.get(self.key(trial.number))
        return None if rec is None else bool(rec["ok"])

    def refused(self, trial) -> bool:
        """Whether a stored record shows trial `trial` failing the full check: its own, or a
        screen's sample over the drift limit (the same batch of the same noise)."""
        if self.study is None:
            return False
        head = f"fresh:{trial.number}:{self.n}:{self.vext.id}"
        return any(k == head and not rec["ok"] or k.startswith(head + ":") and rec["why"].startswith("drifts")
                   for k, rec in self.study.user_attrs.items() if k.startswith(head))

    def of_trial(self, trial, sched=None) -> dict:
        """Trial `trial`'s record: the one stored in the study, else checked now (and stored)."""
        rec = None if self.study is None else self.study.user_attrs.get(self.key(trial.number))
        if rec is None:
            sched = sched or self.ev.schedule_from_params(trial.params, f"trial-{trial.number}")
            rec = json.loads(json.dumps(self.check(sched), default=float))  # as the storage returns it
            if self.study is not None:
                self.study.set_user_attr(self.key(trial.number), rec)
        return rec

    def __call__(self, trial) -> bool:
        """Whether the trial's schedule holds both constraints on the verification noise."""
        return bool(self.of_trial(trial)["ok"])
