"""Abuse and edges of the HTTP surface: oversized prompts, bad Unicode, deep JSON, the catch-all 500,
the endpoints and flags vLLM users expect (/tokenize, /detokenize, /version, HEAD /health, CORS,
positional MODEL, --tokenizer, --dtype, --seed, parser flags) and the start-up banner.

A real serve.py process over loopback unless noted; no timing is asserted (a starved /health would
show as a timed-out request, not as a measured latency).
"""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_process import REPO, ServerProcess

pytestmark = pytest.mark.slow  # real server processes

MODEL = "glm5-tiny-limits"
ORIGIN = "http://allowed.example"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.tiny import ensure_default_model

    cache = tmp_path_factory.mktemp("hwlayer-cache")
    return cache, Path(ensure_default_model(cache_dir=cache))


@pytest.fixture(scope="module")
def server(checkpoint):
    cache, path = checkpoint
    args = [str(path), "--tokenizer", str(path / "tokenizer.json"), "--dtype", "float32", "--allowed-origins", ORIGIN,
            "--max-model-len", "1024", "--kv-block-size", "16", "--num-kv-blocks", "80", "--served-model-name", MODEL,
            "--tool-call-parser", "glm47", "--reasoning-parser", "glm45"]
    with ServerProcess(args, env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}) as proc:
        yield proc


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_oversized_prompts_are_refused_without_starving_health_or_growing_memory(server):
    content = "a" * (4 * MIB - 200)  # just under the 4 MiB body limit
    bodies = {"/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": content}]},
              "/v1/completions": {"model": MODEL, "prompt": content}}

    async def round_of_abuse() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def big(i):
                path = list(bodies)[i % 2]
                r = await http.post(path, json=bodies[path])
                assert_openai_error(r, 400, "messages" if "chat" in path else "prompt", "context_length_exceeded")
                return r.status_code

            async def probe():
                # each probe must answer while 8 huge bodies are in flight (a starved loop times it out)
                codes = []
                for _ in range(10):
                    codes.append((await http.get("/health", timeout=10)).status_code)
                    await asyncio.sleep(0.05)
                return codes

            results = await asyncio.gather(probe(), *(big(i) for i in range(8)))
            return results[0]

    assert all(code == 200 for code in asyncio.run(round_of_abuse()))
    before = rss_bytes(server.proc.pid)
    for _ in range(3):
        asyncio.run(round_of_abuse())
    grown = rss_bytes(server.proc.pid) - before
    assert grown < 512 * MIB, f"RSS grew {grown / MIB:.0f} MiB over three rounds"  # was +3.4 GB: tokenized whole
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "word " * 5000})  # under the
    assert_openai_error(r, 400, "prompt", "context_length_exceeded")  # character bound: refused by token count
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (4 * MIB + 1), headers={"Content-Type": "text/plain"})
    assert_openai_error(r, 413, None, "request_too_large")


def test_lone_surrogates_and_deep_json_are_400(server):
    post = lambda path, raw: httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"})
    r = post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x \\ud800 y"}]}')
    assert_openai_error(r, 400, "messages[0].content", "invalid_encoding")
    r = post("/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 2}')
    assert_openai_error(r, 400, "prompt", "invalid_encoding")
    r = post("/tokenize", b'{"prompt": "\\ud800"}')
    assert_openai_error(r, 400, "prompt", "invalid_encoding")
    r = post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "\\ud800": 1}')
    assert_openai_error(r, 400, "body", "invalid_encoding")
    pair = post("/v1/completions", b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')  # a valid pair is fine
    assert pair.status_code == 200, pair.text
    r = post("/v1/chat/completions", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert_openai_error(r, 400, None, "invalid_json")
    deep = b'{"messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}"
    assert post("/v1/chat/completions", deep).status_code == 400
    assert httpx.get(server.url + "/health").status_code == 200


ODD_BODIES = [
    {"messages": [{"role": "user", "content": {"a": 1}}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "tool", "content": "x"}], "tools": "weather"},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": 3},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}], "tool_choice": "required"},
    {"messages": [{"role": "user", "content": "x"}], "logit_bias": [1, 2]},
    {"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]},
    {"messages": [{"role": "user", "content": "x"}], "response_format": "json"},
    {"messages": [{"role": "user", "content": "x"}], "n": 10**6},
    {"messages": [{"role": "assistant", "tool_calls": "x"}]},
    {"prompt": [1.5, 2]},
    {"prompt": [[]]},
    {"prompt": []},
    {"prompt": ["a", [1, 2]]},
    {"prompt": "x", "logprobs": 50},
    {"prompt": "x", "max_tokens": 0},
]


def test_odd_bodies_get_json_4xx_never_500(server):
    for body in ODD_BODIES:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2, **body}, timeout=60)
        assert r.status_code == 400, (body, r.status_code, r.text[:200])
        assert_openai_error(r, 400)


def test_unexpected_error_is_a_json_500_in_the_openai_shape(checkpoint, monkeypatch):
    from fastapi.testclient import TestClient

    from model import load_model
    from model.tokenizer import load_tokenizer
    from serving.api import ServerConfig, create_app
    from serving.engine import Engine
    from serving.metrics import ServingMetrics

    _, path = checkpoint
    model, tokenizer = load_model(path, backend="cpu"), load_tokenizer(path)
    engine = Engine(model, tokenizer, num_blocks=16, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                    max_model_len=128, eos_token_ids=[])
    app = create_app(engine, tokenizer, ServerConfig("m", 128, "cpu", "cpu"), ServingMetrics())

    def broken_submit(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine, "submit", broken_submit)
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        err = assert_openai_error(r, 500, None, "internal_error")
        assert err["type"] == "server_error" and "ZeroDivisionError" in err["message"]
        assert http.get("/health").status_code == 200


def test_endpoints_head_docs_and_cors(server):
    assert httpx.head(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/docs").status_code == 404  # no page pulling scripts from a CDN
    assert httpx.get(server.url + "/openapi.json").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    tok = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 1024
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    done = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                  "max_tokens": 1}, timeout=60).json()
    assert chat["count"] == done["usage"]["prompt_tokens"]
    assert_openai_error(httpx.post(server.url + "/detokenize", json={"tokens": [-1]}), 400, "tokens")
    assert_openai_error(httpx.post(server.url + "/tokenize", json={"model": "other", "prompt": "x"}), 404, "model",
                        "model_not_found")
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(server.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_banner_only_after_a_successful_bind(server, checkpoint):
    assert "serve.py: serving glm5-tiny-limits" in server.output()
    cache, _ = checkpoint
    clash = ServerProcess(["--max-model-len", "256"], env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"},
                          port=server.port)
    try:
        assert clash.proc.wait(120) != 0
        assert "serve.py: serving" not in clash.output() and "address already in use" in clash.output().lower()
    finally:
        clash.__exit__()


def test_seed_flag_makes_unseeded_sampling_reproducible(checkpoint):
    cache, _ = checkpoint
    body = {"prompt": "Once", "max_tokens": 12, "temperature": 1.0}
    texts = []
    for _ in range(2):
        with ServerProcess(["--seed", "7", "--max-model-len", "256"],
                           env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}) as proc:
            first = httpx.post(proc.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            second = httpx.post(proc.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            texts.append((first, second))
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]


@pytest.mark.parametrize("args, expected", [
    (["--tool-call-parser", "hermes"], "--tool-call-parser"),
    (["--reasoning-parser", "deepseek_r1"], "--reasoning-parser"),
    (["some/dir", "--model", "other/dir"], "disagree"),
    (["--allowed-origins", "allowed.example"], "--allowed-origins"),
    (["--dtype", "int8"], "--dtype"),
    (["--seed", "-1"], "--seed"),
    (["--tokenizer", "/nonexistent/tok"], "tokenizer"),
])
def test_bad_flags_exit_2_with_one_line(args, expected, checkpoint):
    cache, _ = checkpoint
    proc = subprocess.run([sys.executable, str(REPO / "serve.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
