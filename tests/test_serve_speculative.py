"""serve.py --speculative-config over real HTTP: on the bigram checkpoint (model/tiny.py:
make_bigram_checkpoint, where the MTP layer agrees with the model) the greedy completions of
concurrent requests equal those of a server without speculation, /metrics counts drafts and
accepted tokens, and the banner and /metrics say what the memory-sized KV cache holds."""

from __future__ import annotations

import re

import httpx
import pytest
from server_process import ServerProcess
from test_serve_graphs import completions

pytestmark = pytest.mark.slow  # real server processes


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_speculative_server_gives_the_same_greedy_outputs_and_counts_drafts(tmp_path):
    from model.tiny import make_bigram_checkpoint

    path = make_bigram_checkpoint(tmp_path / "bigram")
    env = {"HWLAYER_CACHE": str(tmp_path), "GLM_BACKEND": "cpu", "OMP_NUM_THREADS": "1"}
    args = [str(path), "--served-model-name", "m", "--max-num-seqs", "8", "--max-model-len", "256",
            "--kv-cache-memory-bytes", "2Mi"]
    spec = [*args, "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']
    with ServerProcess(spec, env=env) as fast, ServerProcess(args, env=env) as plain:
        banner = fast.output()
        assert "speculative decoding mtp x2" in banner and "--kv-cache-memory-bytes" in banner
        assert re.search(r"max concurrency \d+\.\d\dx at max-model-len 256", banner)
        with_spec, without = completions(fast.url), completions(plain.url)
        text = httpx.get(fast.url + "/metrics").text
    assert with_spec == without
    drafts = metric(text, "hwlayer_spec_decode_num_draft_tokens_total")
    assert drafts > 0 and metric(text, "hwlayer_spec_decode_num_accepted_tokens_total") >= 0.8 * drafts
    tokens = metric(text, "hwlayer_kv_cache_tokens")
    assert tokens == metric(text, "hwlayer_kv_blocks_total") * 64
    assert metric(text, "hwlayer_kv_cache_max_concurrency") == pytest.approx(tokens / 256)


def test_speculative_server_under_expert_parallelism_answers_like_one_process(tmp_path):
    """torchrun --nproc-per-node 2 serve.py --ep 2 --speculative-config: the verify step and every MTP
    call run on both ranks (the MTP layer's MoE joins the expert all-to-alls); greedy completions equal
    the single-process server's without speculation."""
    import signal
    import sys

    from server_process import REPO

    from model.tiny import make_bigram_checkpoint

    path = make_bigram_checkpoint(tmp_path / "bigram")
    env = {"HWLAYER_CACHE": str(tmp_path), "GLM_BACKEND": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HWLAYER_DIST_TIMEOUT": "60"}
    args = [str(path), "--served-model-name", "m", "--max-num-seqs", "8", "--max-model-len", "256"]
    with ServerProcess(args, env=env) as plain:
        want = completions(plain.url)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    spec = [*args, "--ep", "2", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']
    server = ServerProcess(spec, env=env, launcher=torchrun, new_session=True)
    try:
        server.wait_healthy(120)
        got = completions(server.url)
        text = httpx.get(server.url + "/metrics").text
    finally:
        import os

        server.stop()  # SIGTERM: torchrun forwards it to both ranks
        try:  # never leave a rank behind: the job's process group (new_session) goes, whatever is left of it
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.proc.wait()
        os.unlink(server.log.name)
    assert got == want
    drafts = metric(text, "hwlayer_spec_decode_num_draft_tokens_total")
    assert drafts > 0 and metric(text, "hwlayer_spec_decode_num_accepted_tokens_total") >= 0.8 * drafts
