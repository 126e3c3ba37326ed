"""The model runner: how a step of a batch reaches the device, with decode steps in device graphs.

vLLM's split, kept here: the model (:mod:`model.glm5`) is a plain forward that reads nothing on
the host; the runner owns what is about running it fast:

* host metadata once per step (:class:`model.glm5.StepMetadata`, numpy, validated on the host);
* static device buffers for the step inputs (ids, positions, slots, ``cu_seqlens_q``,
  ``seq_lens``, block table) packed in ONE int64 buffer, filled by ONE host->device copy;
* decode steps (one new token per sequence) captured once per padded batch size of a ladder
  (1, 2, 4, 8, 16, 32, 64, ... up to ``max_num_seqs``) and replayed; every other step (prefill,
  mixed prefill + decode, a batch above the ladder) runs eagerly through ``model.forward_batch``.

A batch of ``B`` decodes runs in the graph of the smallest ladder size ``bs >= B``. The ``bs - B``
padding rows carry slot ``-1`` (``kv_cache_write`` skips them: they write no cache row), one token
at position 0, block-table row 0; their logits are computed and dropped. A captured step's
``max_seqlen_k`` is a context bucket: with device-module graphs (CUDA, NPU) the cache's capacity
``max_model_len``, so one graph serves every context length; with cheap "step" graphs (the CPU's
traced step, whose generic indexer scores every key up to ``max_seqlen_k``) powers of two from
1024 up to ``max_model_len``, each captured on first use, so a short context does not pay for the
longest.

With expert parallelism (``model.ep > 1``) a captured step's MoE layers take the fixed-capacity
all-to-all (``ep_capacity`` = the bucket's tokens: static shapes, no host read, DeepEP low-latency /
Ascend MC2 where the backend has them) and every rank must replay a graph of the same size: the
leader picks the key for all ranks (:meth:`ModelRunner.step_key`, the largest rank's batch rounded up
the ladder; data-parallel attention gives each rank its own sub-batch) and each rank runs it with
:meth:`ModelRunner.run`; a rank with no sequences replays all-padding rows. Prefill and mixed steps
stay eager, on every rank together (the exact all-to-all). vLLM pads the same way
(vllm-project/vllm@00746147 ``vllm/v1/worker/dp_utils.py`` ``coordinate_batch_across_dp``: the
ranks' token counts and CUDA-graph modes are all-reduced, any eager rank makes all eager, all pad to
the max; @e04bcc7 ``device_communicators/all2all.py`` ``DeepEPLLAll2AllManager``: the low-latency
buffer's ``max_num_tokens_per_dp_rank`` "all the ranks must hold the same value"), as does SGLang
(sgl-project/sglang@0021673 ``model_executor/cuda_graph_runner.py`` ``can_run`` /
``replay_prepare``: with DP attention the graph size follows the ranks' gathered token counts).
Here the leader already broadcasts each step, so the key rides with it instead of an all-reduce.

How a backend captures is its declaration (:class:`hwlayer.backend.DeviceGraph`:
``torch.cuda.CUDAGraph``, ``torch.npu.NPUGraph``, the CPU's ``TracedStepGraph``); a backend
without one runs eagerly. :class:`RecordedGraph` is a stand-in the tests use to check the plumbing
itself: it records the step closure at capture and replays it on the same static buffers.

    runner = ModelRunner(model, max_num_seqs=64, max_model_len=4096)        # graphs if the backend has them
    runner.capture(cache)                                                    # optional: at startup
    logits = runner(batch, cache)                                            # Engine's ``forward``
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Protocol

import numpy as np
import torch

from .glm5 import GLM5, Batch, ForwardContext, PagedCache, StepMetadata

log = logging.getLogger("model.runner")

LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # padded decode batch sizes (vLLM / SGLang style)


class StepGraph(Protocol):
    """One captured step: ``capture(fn)`` records ``fn`` (which reads only static buffers) and
    returns its output tensor; ``replay()`` reruns it, refreshing that same output tensor."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def replay(self) -> None: ...


class RecordedGraph:
    """CPU stand-in for a device graph: keeps the step closure and replays it into the output
    tensor produced at capture (a device graph's output is likewise a fixed buffer)."""

    def __init__(self) -> None:
        self._fn: Callable[[], torch.Tensor] | None = None
        self._out: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._fn, self._out = fn, fn()
        return self._out

    def replay(self) -> None:
        assert self._fn is not None and self._out is not None, "replay before capture"
        self._out.copy_(self._fn())


class TorchDeviceGraph:
    """A step in a torch device graph: ``torch.cuda.CUDAGraph`` or torch_npu's ``torch.npu.NPUGraph``
    (same API). Warm-up on a side stream, then capture into a pool shared by all ladder sizes.
    Written against the torch.cuda graph docs (and torch_npu's NPUGraph docs); not run on a GPU
    in this project."""

    def __init__(self, module: object, graph_class: str, pool: object) -> None:
        self.mod, self.pool = module, pool
        self.graph = getattr(module, graph_class)()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        mod = self.mod
        side = mod.Stream()
        side.wait_stream(mod.current_stream())
        with mod.stream(side):
            fn()  # warm-up: lazy initialisation (kernel autotuning, workspaces) happens outside capture
        mod.current_stream().wait_stream(side)
        mod.synchronize()
        with mod.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


def graph_maker(model: GLM5) -> Callable[[], StepGraph] | None:
    """A factory of step graphs for the model's backend, or None when it declares no device graphs."""
    spec = model.plan.backend.device_graph
    if spec is None:
        return None
    module = importlib.import_module(spec.module)
    if spec.kind == "step":  # the class captures a step itself
        return getattr(module, spec.graph)
    pool = module.graph_pool_handle()
    return lambda: TorchDeviceGraph(module, spec.graph, pool)


def context_buckets(max_model_len: int, cheap_graphs: bool) -> tuple[int, ...]:
    """The ``max_seqlen_k`` values decode graphs are captured for: ``max_model_len`` alone, or (cheap
    graphs) powers of two from 1024 below it, then ``max_model_len``."""
    buckets, b = [], 1024
    while cheap_graphs and b < max_model_len:
        buckets.append(b)
        b *= 2
    return (*buckets, max_model_len)


class ModelRunner:
    """Runs steps of ``model``: decode batches replayed from device graphs, everything else eager.

    ``graphs``: ``"auto"`` (default) uses the backend's declared device graphs, eager without;
    ``None`` (``--enforce-eager``) runs every step eagerly; a callable returning a
    :class:`StepGraph` (such as :class:`RecordedGraph`) picks the implementation. ``capture_sizes``
    overrides the ladder (sizes above ``max_num_seqs`` are dropped; ``max_num_seqs`` itself is
    always included so every admissible decode batch has a graph). ``buckets``: the captured steps'
    ``max_seqlen_k`` values (default: :func:`context_buckets`, several only for "step" graphs).

    Call it like ``model.forward_batch``: ``runner(batch, cache) -> fp32 [B, vocab]`` (a fresh
    tensor: the graph's output buffer is reused by the next replay). Graphs are captured for one
    cache (their buffers' addresses are baked in): :meth:`capture` at startup, or lazily on the
    first decode step; a step on another cache runs eagerly.
    """

    def __init__(self, model: GLM5, *, max_num_seqs: int, max_model_len: int,
                 graphs: str | Callable[[], StepGraph] | None = "auto",
                 capture_sizes: tuple[int, ...] | None = None, buckets: tuple[int, ...] | None = None,
                 num_speculative_tokens: int = 0) -> None:
        if max_num_seqs < 1 or max_model_len < 1:
            raise ValueError(f"ModelRunner: expected max_num_seqs >= 1 and max_model_len >= 1, got "
                             f"{max_num_seqs}, {max_model_len}")
        self.model = model
        self.max_model_len = max_model_len
        # Tokens per row of a captured step: 1 (decode), or 1 + N under speculative decoding, whose
        # verify steps (the pending token and N drafts per sequence) are what the graphs capture; they
        # return the hidden states of every row (the engine runner takes logits and MTP drafts from them).
        self.q = 1 + num_speculative_tokens
        self.make_graph = graph_maker(model) if graphs == "auto" else graphs
        if isinstance(self.make_graph, str):
            raise ValueError(f"ModelRunner: graphs expected 'auto', None or a callable, got {graphs!r}")
        sizes = sorted({s for s in (capture_sizes or LADDER) if 1 <= s < max_num_seqs} | {max_num_seqs})
        self.capture_sizes: tuple[int, ...] = tuple(sizes) if self.make_graph is not None else ()
        spec = model.plan.backend.device_graph
        cheap = graphs == "auto" and spec is not None and spec.kind == "step"
        if buckets is None:
            self.buckets = context_buckets(max_model_len, cheap)
        else:
            self.buckets = tuple(sorted({b for b in buckets if 1 <= b < max_model_len} | {max_model_len}))
        self._eager_if_capture_fails = cheap  # a traced step that cannot be traced: eager, with a warning
        # Speculative decoding: the MTP draft step of each verify graph, captured on first use; it reads
        # the verify graph's hidden-state output, the same static step buffer, and two more: the token
        # after each row, and the row each sequence drafts from.
        self.draft_graphs: dict[tuple[int, int], tuple[StepGraph, torch.Tensor]] = {}
        self._last_key: tuple[int, int] | None = None  # the graph that ran the last hidden_states step
        self._draft_ids: torch.Tensor | None = None
        self._draft_rows: torch.Tensor | None = None
        self.draft_replays = 0
        # (bs, max_seqlen_k bucket) -> (graph, its output buffer)
        self.graphs: dict[tuple[int, int], tuple[StepGraph, torch.Tensor]] = {}
        self.graph_cache: PagedCache | None = None
        self.replays = 0  # steps served by a graph
        self.eager_steps = 0
        self._static: torch.Tensor | None = None

    @property
    def uses_graphs(self) -> bool:
        return bool(self.capture_sizes)

    supports_rows = True  # __call__ takes ``rows`` (serving/runner.py: prompt logprobs)

    # ---- the step ---------------------------------------------------------------------------
    def step_key(self, batches: list[Batch], cache: PagedCache) -> tuple[int, int] | None:
        """The graph ``(ladder size, context bucket)`` every rank replays for a step in which the ranks
        run ``batches`` (plain expert parallelism: the one batch all ranks run; data-parallel attention:
        each rank's own, an idle rank's empty), or None when the step runs eagerly on every rank (a
        prefill or mixed step anywhere, a batch above the ladder). The leader calls it and sends the
        key with the step, so all ranks agree on the size of the fixed-capacity all-to-alls (host work)."""
        if self.q != 1:
            return None  # speculative verify steps: not through here
        keys = []
        for batch in batches:
            meta = StepMetadata.from_batch(batch, cache.block_size, cache.num_blocks,
                                           self.model.config.max_position_embeddings)
            if meta.seq_lens.shape[0] == 0:
                continue  # an idle rank replays whatever size the others need
            key = self._graph_key(meta, cache)
            if key is None:
                return None
            keys.append(key)
        if not keys:
            return None
        return max(k[0] for k in keys), max(k[1] for k in keys)  # ladder values: the max is one too

    @torch.inference_mode()
    def run(self, batch: Batch, cache: PagedCache, key: tuple[int, int] | None) -> torch.Tensor:
        """Logits of ``batch``'s last new tokens, in the graph ``key`` the leader chose for every rank
        (:meth:`step_key`), or eagerly when None. An empty ``batch`` (an idle data-parallel rank) with a
        key replays that graph on padding rows only: it still joins every MoE all-to-all."""
        meta = StepMetadata.from_batch(batch, cache.block_size, cache.num_blocks,
                                       self.model.config.max_position_embeddings)
        if key is None:
            self.eager_steps += 1
            return self.model.forward_context(meta.to_device(self.model.device, self.model.cos_sin), cache)
        B = meta.seq_lens.shape[0]
        if B > key[0] or meta.input_ids.shape[0] != B * self.q or meta.max_seqlen_k > key[1]:
            raise ValueError(f"ModelRunner.run: graph {key} (rows, context bucket) cannot hold this rank's batch of "
                             f"{B} sequences, {meta.input_ids.shape[0]} tokens, longest context {meta.max_seqlen_k}; "
                             "the key must come from step_key over every rank's batch")
        return self._run(meta, cache, key)

    @torch.inference_mode()
    def __call__(self, batch: Batch, cache: PagedCache, rows: np.ndarray | None = None) -> torch.Tensor:
        """Logits of each sequence's last new token, or (``rows``: flat token indices) of those rows,
        eagerly (prefill rows for prompt logprobs)."""
        meta = StepMetadata.from_batch(batch, cache.block_size, cache.num_blocks,
                                       self.model.config.max_position_embeddings)
        if rows is not None or self.q != 1:  # not a plain decode step the graphs hold
            self.eager_steps += 1
            ctx = meta.to_device(self.model.device, self.model.cos_sin)
            if rows is None:
                return self.model.forward_context(ctx, cache)
            h = self.model.hidden_states(ctx.input_ids, ctx, cache)
            return self.model.logits(h[torch.from_numpy(np.asarray(rows)).to(h.device)])
        return self._run(meta, cache, self._graph_key(meta, cache))

    @torch.inference_mode()
    def hidden_states(self, batch: Batch, cache: PagedCache) -> torch.Tensor:
        """Final hidden states ``[T, D]`` of every new token: speculative verify steps replayed from the
        graphs (captured with ``num_speculative_tokens``), everything else eager."""
        meta = StepMetadata.from_batch(batch, cache.block_size, cache.num_blocks,
                                       self.model.config.max_position_embeddings)
        if self.q == 1:
            self.eager_steps += 1
            ctx = meta.to_device(self.model.device, self.model.cos_sin)
            return self.model.hidden_states(ctx.input_ids, ctx, cache)
        return self._run(meta, cache, self._graph_key(meta, cache))

    def _run(self, meta: StepMetadata, cache: PagedCache, key: tuple[int, int] | None) -> torch.Tensor:
        """The step of ``meta`` in graph ``key`` (None: eagerly): logits of the last rows (``q`` 1) or
        hidden states of all rows (``q`` > 1)."""
        B = meta.seq_lens.shape[0]
        self._last_key = None
        if key is not None:
            if cache is not self.graph_cache:
                self.capture(cache)
            if key not in self.graphs:  # a context bucket first met now (cheap graphs only)
                self._capture_one(*key, cache)
            if key not in self.graphs:  # the capture failed: eager from now on
                key = None
        if key is None:
            self.eager_steps += 1
            ctx = meta.to_device(self.model.device, self.model.cos_sin)
            return self._step(ctx, cache)
        graph, out = self.graphs[key]
        self._load(meta)
        graph.replay()
        self.replays += 1
        self._last_key = key
        return out[:B * self.q].clone()

    @torch.inference_mode()
    def draft(self, next_ids: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The MTP draft step on the verify step :meth:`hidden_states` just replayed, from its graph:
        ``next_ids`` (the token after each row of that step), ``rows`` (the row each sequence drafts
        from). Returns (draft logits ``[len(rows), V]``, the MTP's hidden state at those rows), or None
        when the last step did not run in a graph (the caller runs the MTP layer eagerly)."""
        key = self._last_key
        if key is None or self.model.mtp is None or len(rows) > key[0]:
            return None
        cache = self.graph_cache
        if self._draft_ids is None:
            n = self.capture_sizes[-1]
            self._draft_ids = torch.zeros(n * self.q, dtype=torch.int64, device=self.model.device)
            self._draft_rows = torch.zeros(n, dtype=torch.int64, device=self.model.device)
        host_ids = np.zeros(self._draft_ids.shape[0], np.int64)
        host_ids[:len(next_ids)] = next_ids
        host_rows = np.zeros(self._draft_rows.shape[0], np.int64)
        host_rows[:len(rows)] = rows
        self._draft_ids.copy_(torch.from_numpy(host_ids), non_blocking=True)
        self._draft_rows.copy_(torch.from_numpy(host_rows), non_blocking=True)
        if key not in self.draft_graphs:
            bs, bucket = key
            ctx = self._views(self._static, bs, bucket, cache)
            hidden = self.graphs[key][1]
            ids, sel = self._draft_ids[:bs * self.q], self._draft_rows[:bs]

            def step() -> torch.Tensor:
                logits, x = self.model.mtp(ids, hidden, ctx, cache, return_hidden=True, rows=sel)
                return torch.cat([logits, x[sel].float()], dim=1)

            graph = self.make_graph()
            try:  # captured on the step's real inputs: the capture run writes this step's MTP rows
                self.draft_graphs[key] = (graph, graph.capture(step))
            except Exception as exc:
                if not self._eager_if_capture_fails:
                    raise
                log.warning("draft graph capture failed, drafting eagerly: %s", str(exc).splitlines()[0])
                self._last_key = None
                return None
        else:
            self.draft_graphs[key][0].replay()
        self.draft_replays += 1
        out = self.draft_graphs[key][1][:len(rows)]
        V = self.model.config.vocab_size
        return out[:, :V].clone(), out[:, V:].to(self.model.dtype)

    def _step(self, ctx: ForwardContext, cache: PagedCache) -> torch.Tensor:
        if self.q == 1:
            return self.model.forward_context(ctx, cache)
        return self.model.hidden_states(ctx.input_ids, ctx, cache)

    def _graph_key(self, meta: StepMetadata, cache: PagedCache) -> tuple[int, int] | None:
        """(ladder size, context bucket) of the graph that runs this step, or None for an eager step."""
        B = meta.seq_lens.shape[0]
        if not self.capture_sizes or B == 0 or B > self.capture_sizes[-1] or meta.max_seqlen_q != self.q:
            return None  # prefill or mixed steps, or nothing captured
        if meta.input_ids.shape[0] != B * self.q:
            return None  # rows of different lengths (a sequence verifying fewer drafts)
        if self.graph_cache is not None and cache is not self.graph_cache:
            return None
        if meta.max_seqlen_k > self.max_model_len or meta.block_table.shape[1] > self._max_blocks(cache):
            return None  # outside what the static buffers hold
        return (next(s for s in self.capture_sizes if s >= B), next(b for b in self.buckets if b >= meta.max_seqlen_k))

    # ---- static buffers ---------------------------------------------------------------------
    def _max_blocks(self, cache: PagedCache) -> int:
        return -(-self.max_model_len // cache.block_size)

    def _layout(self, n: int, W: int) -> list[int]:
        """Segment sizes of the packed buffer for ``n`` rows of ``q`` tokens: ids, positions, slots, cu,
        seq_lens, table."""
        t = n * self.q
        return [t, t, t, n + 1, n, n * W]

    def _views(self, buf: torch.Tensor, bs: int, max_seqlen_k: int, cache: PagedCache) -> ForwardContext:
        """The forward context of ladder size ``bs`` and context bucket ``max_seqlen_k``: views into the
        static buffer (int64, which the op contracts accept for every index argument)."""
        n, W = self.capture_sizes[-1], self._max_blocks(cache)
        ids, positions, slots, cu, lens, table = buf.split(self._layout(n, W))
        t = bs * self.q
        # Expert parallelism: every rank replays this size, so the MoE all-to-alls take the fixed-capacity
        # form with t tokens per rank (the bucket's, padding rows included).
        return ForwardContext(positions[:t], slots[:t], cu[: bs + 1], lens[:bs], table.view(n, W)[:bs],
                              self.model.cos_sin, max_seqlen_q=self.q, max_seqlen_k=max_seqlen_k, input_ids=ids[:t],
                              ep_capacity=t if self.model.ep > 1 else None)

    def _host_buffer(self, meta: StepMetadata | None, cache: PagedCache) -> torch.Tensor:
        """The packed host copy of a padded decode step (``meta`` None: all rows padding)."""
        n, W, q = self.capture_sizes[-1], self._max_blocks(cache), self.q
        ids = np.zeros(n * q, np.int64)
        positions = np.tile(np.arange(q, dtype=np.int64), n)  # a padding row: positions 0 .. q-1
        slots = np.full(n * q, -1, np.int64)  # padding rows write nowhere
        cu = np.arange(n + 1, dtype=np.int64) * q  # q tokens per row, padding rows included
        lens = np.full(n, q, np.int64)  # a padding row: a q-token context
        table = np.zeros((n, W), np.int64)
        if meta is not None:
            B, w = meta.seq_lens.shape[0], meta.block_table.shape[1]
            t = B * q
            ids[:t], positions[:t], slots[:t], lens[:B] = (meta.input_ids, meta.positions, meta.slot_mapping,
                                                           meta.seq_lens)
            table[:B, :w] = meta.block_table
        return torch.from_numpy(np.concatenate([ids, positions, slots, cu, lens, table.reshape(-1)]))

    def _load(self, meta: StepMetadata) -> None:
        """Copy the step's inputs into the static buffer: one host->device copy (pinned, async)."""
        host = self._host_buffer(meta, self.graph_cache)
        if self._static.device.type != "cpu":
            host = host.pin_memory()
        self._static.copy_(host, non_blocking=True)

    # ---- capture ----------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, cache: PagedCache) -> None:
        """Capture one decode graph per ladder size for ``cache`` at the largest context bucket
        (largest size first, so the smaller ones reuse its memory pool); graphs of smaller buckets
        are captured on first use. Captures run on all-padding inputs: they write no cache row."""
        if not self.capture_sizes:
            return
        self.graphs.clear()
        self.draft_graphs.clear()
        self.graph_cache = cache
        n, W = self.capture_sizes[-1], self._max_blocks(cache)
        self._static = torch.zeros(sum(self._layout(n, W)), dtype=torch.int64, device=self.model.device)
        for bs in reversed(self.capture_sizes):
            self._capture_one(bs, self.buckets[-1], cache)
        if not self.capture_sizes:
            return
        log.info("captured decode graphs for batch sizes %s", ", ".join(map(str, self.capture_sizes)))

    def _capture_one(self, bs: int, max_seqlen_k: int, cache: PagedCache) -> None:
        if not self.capture_sizes:
            return
        self._static.copy_(self._host_buffer(None, cache))  # all padding: the capture run writes nowhere
        ctx = self._views(self._static, bs, max_seqlen_k, cache)
        graph = self.make_graph()
        try:
            out = graph.capture(lambda: self._step(ctx, cache))
        except Exception as exc:
            if not self._eager_if_capture_fails:
                raise
            # A step the tracer cannot record (an op TorchScript does not know) runs eagerly: slower, same result.
            log.warning("decode graph capture failed, running decode steps eagerly: %s", str(exc).splitlines()[0])
            self.capture_sizes, self.graphs = (), {}
            return
        self.graphs[(bs, max_seqlen_k)] = (graph, out)
