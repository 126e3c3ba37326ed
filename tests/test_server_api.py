"""End to end: a real serve.py process on a loopback port, driven by the official openai client and httpx.

The default model (glm5-tiny-random) generates noise, so the checks compare paths against each other
(chat vs. the raw completion of the same rendered prompt, streaming vs. not, seed vs. seed) and
check accounting (usage, KV blocks back to idle in /metrics) rather than expecting particular words.
"""

import asyncio
import time

import httpx
import openai
import pytest
from server_process import ServerProcess, scrape_metrics

from serving.chat import render_chat
from serving.parsers import parse_output

pytestmark = pytest.mark.slow  # a real server process

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "glm5-tiny-test"  # --served-model-name
# Small cache and batch so that 32 concurrent requests queue for sequence slots and for KV blocks.
SERVER_ARGS = ["--max-model-len", "1024", "--kv-block-size", "16", "--num-kv-blocks", "80", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "96", "--api-key", API_KEY, "--served-model-name", MODEL]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hwlayer-cache")
    with ServerProcess(SERVER_ARGS, env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}) as proc:
        proc.cache = cache
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(server):
    from model.tiny import ensure_default_model
    from model.tokenizer import load_tokenizer

    return load_tokenizer(ensure_default_model(cache_dir=server.cache))  # the checkpoint the server made


def assert_idle(server):
    """No running or waiting request, every KV block free (polls briefly: cancellation lands at a step)."""
    deadline = time.monotonic() + 10
    while True:
        m = scrape_metrics(server.url)
        idle = (m["hwlayer_num_requests_running"] == 0 and m["hwlayer_num_requests_waiting"] == 0
                and m["hwlayer_kv_blocks_used"] == 0 and m["hwlayer_kv_blocks_free"] == m["hwlayer_kv_blocks_total"])
        if idle or time.monotonic() > deadline:
            assert idle, m
            return m
        time.sleep(0.05)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]


def raw_completion(client, prompt: str, max_tokens: int) -> tuple[str, str]:
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text, out.choices[0].finish_reason


def test_health_models_and_metrics_info(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    text = httpx.get(server.url + "/metrics").text
    assert 'hwlayer_server_info{backend="cpu"' in text
    assert "hwlayer_kv_blocks_free 80.0" in text


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_equals_raw_completion_of_rendered_prompt(client, tokenizer, thinking):
    prompt = render_chat(MESSAGES, enable_thinking=thinking)
    raw, raw_finish = raw_completion(client, prompt, 24)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    choice = chat.choices[0]
    expected = parse_output(raw, thinking)
    assert (choice.message.content or "") == expected.content
    assert (getattr(choice.message, "reasoning_content", None) or "") == expected.reasoning
    assert choice.finish_reason == raw_finish
    assert chat.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert 1 <= chat.usage.completion_tokens <= 24
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_top_level_enable_thinking_false_and_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"enable_thinking": False})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert getattr(whole.message, "reasoning_content", None) in (None, "") or whole.message.content is None
    reasoning, content, finish, usage = "", "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (whole.message.reasoning_content or "", whole.message.content or "",
                                            whole.finish_reason)
    assert usage is not None and usage.completion_tokens >= 1


def test_streaming_chat_with_thinking_separates_reasoning(client):
    prompt_kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**prompt_kwargs).choices[0]
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **prompt_kwargs):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert reasoning == (whole.message.reasoning_content or "")
    assert content == (whole.message.content or "")
    assert reasoning  # thinking is on by default: output starts inside <think>


def test_completions_streaming_stop_and_length(client):
    text, finish = raw_completion(client, "Hello there", 12)
    assert finish in ("length", "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == text
    if finish == "length" and len(text) >= 4:  # a stop string taken from the greedy output cuts it there
        stop = text[2:4]
        cut = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    c = client.completions.create(seed=999, **kwargs).choices[0].text
    assert a == b
    assert a != c
    top_3 = client.completions.create(seed=5, extra_body={"top_k": 3}, **kwargs).choices[0].text
    assert top_3 == client.completions.create(seed=5, extra_body={"top_k": 3}, **kwargs).choices[0].text
    # top_k reaches the sampler: keeping one candidate at temperature 1 is greedy decoding
    top_1 = client.completions.create(seed=5, extra_body={"top_k": 1}, **kwargs).choices[0].text
    assert top_1 == client.completions.create(**{**kwargs, "temperature": 0}).choices[0].text


def test_tool_round_trip_prompt(client, tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=8, temperature=0)
    prompt = render_chat(messages, tools)
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>" in prompt
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_32_concurrent_requests_all_succeed_and_blocks_return(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

        async def one(i):
            if i % 2:
                r = await aclient.completions.create(model=MODEL, prompt=f"request {i} " * (1 + i % 5),
                                                     max_tokens=12, temperature=0.7, seed=i)
                return r.usage.completion_tokens
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=12, stream=True)
            return sum([1 async for _ in stream])

        results = await asyncio.gather(*(one(i) for i in range(32)))
        await aclient.close()
        return results

    results = asyncio.run(run())
    assert len(results) == 32 and all(r >= 1 for r in results)
    assert_idle(server)


def test_cancelled_stream_leaves_the_batch_and_frees_blocks(server):
    before = scrape_metrics(server.url)
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
            running = scrape_metrics(server.url)
            assert running["hwlayer_num_requests_running"] == 1 and running["hwlayer_kv_blocks_used"] >= 1
        # leaving the block closes the connection mid-stream
    after = assert_idle(server)
    aborted = 'hwlayer_request_finished_total{reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["hwlayer_generation_tokens_total"] - before["hwlayer_generation_tokens_total"] < 400


def test_non_streaming_client_that_gives_up_cancels_its_request(server):
    before = scrape_metrics(server.url)
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=0.5)
    after = assert_idle(server)
    aborted = 'hwlayer_request_finished_total{reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1


BAD_BODIES = [
    (b"{not json", 400, "invalid_json", None),
    (b'{"model": "glm5-tiny-random", "prompt": "\xff\xfe"}', 400, "invalid_encoding", None),
    (b"[1, 2]", 400, "invalid_json", None),
]


@pytest.mark.parametrize("raw, status, code, param", BAD_BODIES)
def test_malformed_bodies(server, raw, status, code, param):
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and set(err) == {"message", "type", "param", "code"}


BAD_CHAT = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 7}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": 5}, "stop"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens (4)
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"stop_token_ids": [-5]}, "stop_token_ids"),
    ({"stop_token_ids": [10**12]}, "stop_token_ids"),
    ({"tool_choice": "bogus"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "get_weather"}}]}, "tool_choice"),
    ({"stream": True, "stream_options": {"include_usage": True, "every_token": True}}, "stream_options"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "maximal"}, "reasoning_effort"),
    ({"reasoning_effort": 3}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant"}]}, "messages[1].content"),
    ({"stream": "yes"}, "stream"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "enable_thinking"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),
]


def test_bad_requests_get_400_with_the_field_named_and_server_stays_healthy(server):
    for patch, param in BAD_CHAT:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400, (patch, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (patch, err)
        assert err["type"] == "invalid_request_error" and "\n" not in err["message"] and err["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [10**9]}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    for field, value in (("suffix", "end"), ("best_of", 3)):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", field: value}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user",
                   "content": "hi"}]}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * (5 * 1024 * 1024)}, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/health").status_code == 200
    assert_idle(server)


def test_api_key_required(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.post(server.url + "/v1/completions", json=body, headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_request_counter_and_token_counters(server):
    m = scrape_metrics(server.url)
    assert m['hwlayer_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m['hwlayer_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 1
    assert m["hwlayer_prompt_tokens_total"] > 0 and m["hwlayer_generation_tokens_total"] > 0


def test_thinking_switches_reach_the_template(client, tokenizer):
    history = [{"role": "user", "content": "Q1"},
               {"role": "assistant", "content": "A1", "reasoning_content": "R1 " * 20},
               {"role": "user", "content": "Q2"}]

    def prompt_tokens(**extra):
        out = client.chat.completions.create(model=MODEL, messages=history, max_tokens=1, extra_body=extra)
        return out.usage.prompt_tokens

    def count(**kw):
        return len(tokenizer.encode(render_chat(history, **kw), add_special_tokens=False).ids)

    assert prompt_tokens() == count()
    assert prompt_tokens(chat_template_kwargs={"clear_thinking": False}) == count(clear_thinking=False) > count()
    assert prompt_tokens(thinking={"type": "enabled", "clear_thinking": False}) == count(clear_thinking=False)
    assert prompt_tokens(thinking={"type": "disabled"}) == count(enable_thinking=False)
