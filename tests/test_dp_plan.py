"""``python -m model plan --ep N --dp-attention``: KV bytes per rank and 200K-token contexts per node."""

from pathlib import Path

import pytest

from model.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
GLM5_CONFIG = Path("/work/shared/reference/glm5-config.json")
if not GLM5_CONFIG.is_file():
    GLM5_CONFIG = ROOT / "shared" / "reference" / "glm5-config.json"


@pytest.mark.skipif(not GLM5_CONFIG.is_file(), reason="the GLM-5 reference config.json is not in this checkout")
def test_glm5_fp8_ep8_kv_per_rank_and_contexts_per_node(capsys):
    assert main(["plan", "--config", str(GLM5_CONFIG), "--ep", "8", "--dtype", "fp8", "--dp-attention",
                 "--contexts", "8", "--device-memory", "200GiB"]) == 0
    out = capsys.readouterr().out
    # 111,232 bytes of bf16 cache per token (78 layers + MTP, 704 values each) x 200,000 tokens
    assert "kv cache per rank with --dp-attention: 1 own context(s) = 20.72 GiB (22,246,400,000 bytes)" in out
    assert "kv cache per rank without (replicated): 8 contexts = 165.75 GiB (177,971,200,000 bytes)" in out
    assert "weights (fp8_block) 106.85 GiB, 93.15 GiB left for KV" in out
    # 93.15 GiB / 20.72 GiB = 4 contexts per rank: 8 ranks hold 32 with DP attention, 4 replicated
    assert "200000-token contexts per node of 8 devices: 32 with --dp-attention (4 per rank), 4 without" in out


def test_bad_dp_plan_input_is_one_line_exit_2(capsys):
    from model.tiny import ensure_default_model

    config = str(ensure_default_model() / "config.json")
    for argv, message in [
        (["--ep", "1", "--dp-attention"], "--dp-attention needs --ep N >= 2 dividing n_routed_experts (8), got --ep 1"),
        (["--ep", "2", "--dp-attention", "--contexts", "0"], "--contexts and --context-len must be positive, got 0"),
        (["--ep", "2", "--dp-attention", "--device-memory", "lots"], "--device-memory 'lots': expected a size like "
                                                                     "141GiB"),
    ]:
        assert main(["plan", "--config", config, *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err
