"""The FID sample budget split over processes started by torchrun (NCCL on GPUs, gloo on CPU).

Every rank draws the same noise and labels and samples its own contiguous run of whole batches,
so each batch is exactly the batch one process would sample; features (and per-sample drift)
are gathered on rank 0 in rank order, so N processes compute the FID one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tarflow.data import to_uint8
from tarflow.sampling import sample_batched


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def span(self, n: int, batch: int) -> slice:
        """This rank's share of n items: whole batches, contiguous, in rank order."""
        batches = -(-n // batch)
        lo, hi = batches * self.rank // self.world, batches * (self.rank + 1) // self.world
        return slice(lo * batch, min(hi * batch, n))

    def gather(self, a: np.ndarray) -> np.ndarray | None:
        """Rows of every rank concatenated in rank order on rank 0; None elsewhere."""
        if self.world == 1:
            return a
        parts = [None] * self.world if self.main else None
        dist.gather_object(a, parts, dst=0)
        return np.concatenate(parts) if self.main else None


    def close(self) -> None:
        """Leave the process group together: a barrier, then its teardown. A rank that simply
        exits while a peer still holds its connection can take that peer down (gloo aborts a
        process whose peer closed the socket under it: rank 1 died of SIGABRT in about one run in
        ten on a loaded 2-core machine)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_ranks(device: str) -> Ranks:
    """Join the process group torchrun describes in the environment (a single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def launch(workers: int) -> int:
    """Re-run this command under torchrun with `workers` local processes; its exit code. The
    arguments travel in the environment: torchrun's own parser would take `--n` for its options."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--workers"):
            skip = a == "--workers"
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
           "-m", "tuner"]
    return subprocess.run(cmd, env=dict(os.environ, TARFLOW_TUNER_ARGS=json.dumps(args))).returncode


def sample_features(model, schedule, noise, labels, *, settings, batch: int, extractor, ranks: Ranks,
                    progress: bool = False, solvers=None, stats: list | None = None):
    """This rank's samples (model space, for paired metrics) and the features of all samples
    (on rank 0; None elsewhere). `solvers`: a tarflow.solvers.SolverChoice (default eager);
    `stats`, when given, receives this rank's per-batch SamplerStats (what the sampling cost)."""
    part = ranks.span(len(noise), batch)
    x, batch_stats = sample_batched(model, schedule, noise[part], None if labels is None else labels[part],
                                    settings=settings, batch=batch, **({} if solvers is None else {"solvers": solvers}))
    if stats is not None:
        stats.extend(batch_stats)
    feats = extractor.features(to_uint8(x), progress=progress and ranks.main)
    return x, ranks.gather(feats)
