"""Static-buffer transformer step for CUDA graphs: one captured graph serves every step of a span length.

`StaticSolver` keeps the contract of `tarflow.sampling.BlockSolver.params(x_span, start)`, but
everything its step touches lives in a buffer allocated once: the K/V cache over all T positions,
the input span, the position (a device tensor, so no Python int reaches the step) and, under a
graph, the outputs. Queries attend over the whole cache through a mask built from the position
tensor, and the span's K/V are written with `index_copy_`. A sequential block therefore needs one
graph (span length 1) and a Jacobi block one or two (segment lengths differ by at most one).
The transformer and the guidance mix are the eager sampler's (`MetaBlock.run`, `tarflow.guidance`):
this module supplies only the K/V writer and the buffers, so the two paths cannot drift apart.

Execution: eagerly on CPU (what the tests compare with BlockSolver), or on CUDA with
`graphs=True` one `torch.cuda.CUDAGraph` captured per span length on first use and replayed
after; `compile=True` runs the step through `torch.compile` (captured too, with graphs; it raises
dynamo's recompile limit, a process-wide setting). Pass
`StaticSolvers(...)` as `sample(..., solvers=...)`: it keeps one solver per block, batch size and
settings across calls, so graphs are captured once per process, not once per sample call.

Differences from BlockSolver: none while the iterates are finite. A non-finite key or value is
stored as 0, because masked slots past the span are read here (BlockSolver never reads them) and
one NaN there would poison every query; the token-by-token fallback then re-solves exactly.

Sync budget (host reads of device values while sampling): the step itself makes none, and
capture enforces it (a host read inside `torch.cuda.graph` raises). The sampler around it may
read only convergence flags: per Jacobi segment at most ceil(passes / check_every), one per block
beyond that at most. `tests/test_gpu_prep.py` counts the reads the current sampler makes.
"""

from __future__ import annotations

import torch

from .guidance import guide
from .model import MetaBlock
from .sampling import BlockSolver, state_dtype
from .settings import SamplingSettings

WARMUP = 2  # eager runs on a side stream before a capture (cuBLAS/cuDNN workspaces, lazy init)


def allow_recompiles(limit: int = 64) -> None:
    """Raise dynamo's per-function recompile limit (8 by default): every block and span length
    compiles its own graph, and past the limit the step would silently run uncompiled."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


class Span:
    """Buffers of one span length: the input, and under a graph the graph and its outputs."""

    def __init__(self, x):
        self.x = x
        self.graph = None
        self.out = None


class StaticSolver(BlockSolver):
    """BlockSolver whose step has static shapes and a device-side position (see module docstring)."""

    def __init__(self, block: MetaBlock, labels, n: int, settings: SamplingSettings, device, dtype,
                 *, graphs: bool = False, compile: bool = False, pool=None):
        super().__init__(block, labels, n, settings, device, dtype)
        T = self.pos.shape[0]
        self.device = torch.device(device)
        self.state_dtype = state_dtype(dtype)  # of the iterates and of (a, b)
        if self.class_emb is not None:
            self.class_emb = self.class_emb.contiguous()  # a buffer `load` writes (never a broadcast view)
        self.positions = torch.arange(T, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.spans: dict[int, Span] = {}
        self.capture = graphs and self.device.type == "cuda"
        self.pool = pool
        if compile:
            allow_recompiles()
        self.step_fn = torch.compile(self.step, dynamic=False) if compile else self.step

    def load(self, labels):
        """Labels of a new call into the class-embedding buffer (nothing else depends on them)."""
        if self.class_emb is None:
            return
        rows = self.cache.k.shape[1]
        y = torch.full((rows,), -1, device=self.device, dtype=torch.long)
        if labels is not None:
            y[:self.n] = labels
        self.class_emb.copy_(self.block.class_embedding(y, rows))

    def step(self, x):
        """(a, b) stacked as (2, n, L, D) for the span in buffer x at position buffer `start`.

        The transformer is `MetaBlock.run`, as in the eager sampler; only the K/V writer differs:
        `index_copy_` at device-side positions into the full-length cache, queries masked to the
        positions up to their own (so every tensor has a static shape)."""
        block, L = self.block, x.shape[1]
        if self.guided:
            x = x.repeat(2, 1, 1)
        idx = self.start + self.positions[:L]  # (L,) positions of the span
        mask = self.positions[None, :] <= idx[:, None]  # (L, T): each query sees keys up to itself

        def write(i, k, v):
            k_buf, v_buf = self.cache.k[i], self.cache.v[i]
            k_buf.index_copy_(2, idx, k.nan_to_num(0.0, 0.0, 0.0))  # see "Differences" above
            v_buf.index_copy_(2, idx, v.nan_to_num(0.0, 0.0, 0.0))
            return k_buf, v_buf, mask

        out = block.run(x.to(self.dtype), self.pos.index_select(0, idx), self.class_emb, write, self.q_scale)
        a, b = (t.to(self.state_dtype) for t in out)
        if self.guided:
            a, b = guide(a, b, self.w.index_select(1, idx))
        return torch.stack([a, b])

    def params(self, x_span, start: int):
        """Same contract as BlockSolver.params: (a, b) of tokens start+1 .. start+L, K/V written."""
        L = x_span.shape[1]
        span = self.spans.get(L)
        if span is None:
            span = self.spans[L] = Span(torch.empty_like(x_span, memory_format=torch.contiguous_format))
        span.x.copy_(x_span)
        self.start.fill_(start)
        if not self.capture:
            return tuple(self.step_fn(span.x))
        if span.graph is None:
            self._capture(span)
        span.graph.replay()
        return tuple(span.out.clone())  # graphs share a memory pool: copy before the next replay

    def _capture(self, span: Span):
        """Warm up on a side stream, then capture; both write this span's K/V as the replay will."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.step_fn(span.x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        span.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(span.graph, pool=self.pool):
            span.out = self.step_fn(span.x)


class StaticSolvers:
    """Solver factory for `sample(..., solvers=StaticSolvers())`: reuses one StaticSolver (its
    buffers and graphs) per block, batch size, settings, device and dtype across calls.

    A solver is rebuilt when a parameter is replaced (a cast or a move: a captured graph reads
    the old addresses) or modified in place (the flipped position table is a copy)."""

    def __init__(self, *, graphs: bool = True, compile: bool = False):
        self.graphs, self.compile = graphs, compile
        self.solvers: dict[tuple, StaticSolver] = {}
        self.pool = None

    def __call__(self, block: MetaBlock, labels, n: int, settings: SamplingSettings, device, dtype):
        weights = tuple((p.data_ptr(), p._version) for p in block.parameters())
        key = (id(block), n, settings, str(device), dtype, weights)
        solver = self.solvers.get(key)
        if solver is not None:
            solver.load(labels)
            return solver
        if self.graphs and self.pool is None and torch.device(device).type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        solver = StaticSolver(block, labels, n, settings, device, dtype, graphs=self.graphs,
                              compile=self.compile, pool=self.pool)
        self.solvers[key] = solver
        return solver
