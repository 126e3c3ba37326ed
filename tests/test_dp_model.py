"""Data-parallel attention + expert parallelism in real torchrun jobs (gloo, 2 and 4 ranks).

Each job runs this file as its worker script. No rank calls ``init_distributed``:
``load_model(path, ep=N)`` joins the torchrun job itself. Rank 0 runs the serving scheduler
(:class:`serving.dp.DPEngine` with its distributed :class:`serving.dp.DPLeader` step) over three
greedy requests, the other ranks run :func:`serving.dp.follower_loop`, exactly as ``serve.py --ep N
--dp-attention`` does minus HTTP. With 4 ranks and 3 sequences one rank has nothing to do and must
still join every MoE all-to-all, with zero rows.

The test checks, against one process with the whole model:
* the generated tokens equal the single-process engine's;
* the fp32 logits of every DP step equal ``forward_batch`` of the same batch in one process;
* each rank computed attention for its own sequences' tokens only (traced ``forward_batch`` sizes)
  and joined every MoE layer's ``ep_dispatch`` (traced calls, zero rows on an idle rank);
* each rank's cache holds rows only in the blocks of its own sequences.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun workers

REPO = Path(__file__).resolve().parents[1]
JOB_LIMIT_S = 120
PER_RANK, BLOCK = 12, 4
MAX_TOKENS = 5
ROUTING = {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3}  # every token crosses ranks


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in (7, 3, 10)]


def _engine_kwargs() -> dict:
    return dict(block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, eos_token_ids=[])


def _run(engine, prompts: list[list[int]]) -> list[list[int]]:
    from serving.engine import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = [engine.submit(p, params, lambda e: None) for p in prompts]
    for _ in range(1000):
        if all(s.finished for s in seqs):
            break
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("dp-ckpt"), config_overrides=ROUTING)


@pytest.fixture(scope="module")
def single(checkpoint: Path):
    from model import load_model
    from model.tokenizer import load_tokenizer
    from serving.engine import Engine

    m = load_model(checkpoint, backend="cpu")
    engine = Engine(m, load_tokenizer(checkpoint), num_blocks=4 * PER_RANK, **_engine_kwargs())
    return m, _run(engine, _prompts(m.config.vocab_size))


def _job(world: int, checkpoint: Path, out_dir: Path) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           __file__, str(checkpoint), str(out_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HWLAYER_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[test] torchrun job killed after {JOB_LIMIT_S} s"
    return proc.returncode, out


@pytest.mark.parametrize("world", [2, 4])
def test_dp_attention_matches_single_process(world: int, checkpoint: Path, single, tmp_path: Path) -> None:
    m, want = single
    code, out = _job(world, checkpoint, tmp_path)
    assert code == 0, out
    leader = torch.load(tmp_path / "rank0.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    assert leader["generated"] == want  # greedy tokens: identical to the single-process engine

    # fp32 logits of every DP step == the same (global-block) batch in one process, one cache
    cache = m.new_cache(world * PER_RANK, BLOCK)
    from model import Batch

    for step, (batch, logits) in enumerate(leader["steps"]):
        torch.testing.assert_close(logits, m.forward_batch(Batch(**batch), cache), rtol=1e-5, atol=1e-5,
                                   msg=lambda e, s=step: f"step {s}: {e}")

    owners = leader["owners"]
    counts = [owners.count(r) for r in range(world)]
    assert len(owners) == 3 and max(counts) - min(counts) <= 1, owners  # least loaded rank first
    n_moe = sum(1 for layer in m.layers if hasattr(layer.mlp, "w13"))
    n_steps = len(leader["steps"])
    for r, got in enumerate(ranks):
        # attention for its own tokens only: forward_batch saw exactly its share of every step
        assert got["forward_tokens"] == [share[r] for share in leader["tokens_per_step"]], r
        assert sum(got["forward_tokens"]) == sum(len(p) + MAX_TOKENS - 1 for p, o in
                                                 zip(leader["prompts"], owners, strict=True) if o == r)
        # every rank joined every MoE layer's all-to-all, an idle one with zero rows
        assert len(got["dispatch_rows"]) == n_steps * n_moe, r
        if r not in owners:
            assert set(got["dispatch_rows"]) == {0}, r
        # its cache holds rows only in its own sequences' blocks
        assert got["written_blocks"] == leader["blocks_per_rank"][r], r
        assert bool(got["written_blocks"]) == (r in owners)
    assert world == 2 or any(r not in owners for r in range(world))  # 4 ranks, 3 sequences: one idle rank


# --------------------------------------------------------------------------------------------
# The worker (run by torchrun)


def _worker(checkpoint: str, out_dir: str) -> int:
    from model import load_model
    from model.tokenizer import load_tokenizer
    from serving import dp
    from serving import ep as ep_mod

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    m = load_model(checkpoint, backend="cpu", ep=world)  # joins the torchrun job itself
    trace: dict = {"forward_tokens": [], "dispatch_rows": [], "caches": []}
    forward, dispatch, new_cache = m.forward_batch, m.plan.ep_dispatch, m.new_cache

    def traced_forward(batch, cache):
        trace["forward_tokens"].append(int(batch.input_ids.numel()))
        return forward(batch, cache)

    def traced_dispatch(x, *args, **kwargs):
        trace["dispatch_rows"].append(int(x.shape[0]))
        return dispatch(x, *args, **kwargs)

    def traced_cache(*args, **kwargs):
        trace["caches"].append(new_cache(*args, **kwargs))
        return trace["caches"][-1]

    m.forward_batch, m.plan.ep_dispatch, m.new_cache = traced_forward, traced_dispatch, traced_cache
    result: dict = {}
    if rank == 0:
        engine = dp.DPEngine(m, load_tokenizer(checkpoint), world=world, num_blocks=PER_RANK, **_engine_kwargs())
        leader = engine.forward
        steps, tokens_per_step, blocks = [], [], [set() for _ in range(world)]

        def recorded(batch, cache):
            logits = leader(batch, cache)
            steps.append((dict(vars(batch)), logits.clone()))  # plain tensors: torch.load(weights_only)
            tokens_per_step.append(list(leader.last_tokens))
            subs, _ = dp.split_batch(batch, world, PER_RANK, BLOCK)
            for r, sub in enumerate(subs):
                for row, n in zip(sub.block_table.tolist(), sub.seq_lens.tolist(), strict=True):
                    blocks[r] |= set(row[:-(-n // BLOCK)])
            return logits

        engine.forward = recorded
        prompts = _prompts(m.config.vocab_size)
        seqs_owner: list[int] = []
        generated = _run(_Owners(engine, seqs_owner), prompts)
        ep_mod.shutdown_followers(False)
        result = {"generated": generated, "steps": steps, "tokens_per_step": tokens_per_step,
                  "blocks_per_rank": blocks, "owners": seqs_owner, "prompts": prompts}
        cache = engine.cache
    else:
        dp.follower_loop(m, PER_RANK, BLOCK)
        cache = trace["caches"][0]
    written = {b for b in range(PER_RANK) if bool(cache.kv[0][b].abs().sum() > 0)}
    torch.save({**result, "forward_tokens": trace["forward_tokens"], "dispatch_rows": trace["dispatch_rows"],
                "written_blocks": written}, Path(out_dir) / f"rank{rank}.pt")
    return 0


class _Owners:
    """The engine, noting each sequence's rank after its first step (for the test's bookkeeping)."""

    def __init__(self, engine, owners: list[int]) -> None:
        self.engine, self.owners, self.seqs = engine, owners, []

    def submit(self, *args, **kwargs):
        self.seqs.append(self.engine.submit(*args, **kwargs))
        return self.seqs[-1]

    def step(self) -> None:
        self.engine.step()
        if not self.owners and all(s.blocks for s in self.seqs):
            self.owners.extend(self.engine.rank_of(s) for s in self.seqs)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
