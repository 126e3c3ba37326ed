"""serve.py with a tiny FP8 checkpoint: a real server process keeps the weights in fp8 (its banner
says which format it loaded) and answers completions; --weight-format converts or fails in one line."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from server_process import REPO, ServerProcess

from model.tiny import QUANT_TINY_OVERRIDES, make_tiny_checkpoint

pytestmark = pytest.mark.slow  # starts serve.py


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "fp8"
    return make_tiny_checkpoint(path, QUANT_TINY_OVERRIDES, weight_format="fp8_block")


@pytest.mark.parametrize("flag, loaded", [([], "fp8_block"), (["--weight-format", "int8"], "int8")])
def test_serve_keeps_fp8_weights(fp8_ckpt, flag, loaded):
    env = {"GLM_BACKEND": "cpu", "HWLAYER_TRITON": "0"}
    with ServerProcess(["--model", str(fp8_ckpt), *flag], env=env) as srv:
        assert f"on backend cpu, weights {loaded}," in srv.output()
        r = httpx.post(srv.url + "/v1/completions", json={"model": fp8_ckpt.name, "prompt": "Hello world",
                                                          "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1


def test_serve_unknown_weight_format_exits_2(fp8_ckpt):
    r = subprocess.run([sys.executable, str(REPO / "serve.py"), "--model", str(fp8_ckpt), "--weight-format", "fp4"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env={"GLM_BACKEND": "cpu",
                                                                                   "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--weight-format" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
