"""End to end: serve.py renders the checkpoint's own chat template, or ``--chat-template FILE``, and says which.

A tiny checkpoint (model/tiny.py, written into a tmp dir) gets a chat_template.jinja that deliberately differs
from the built-in GLM-5 layout (GLM-4.6 style: a newline after each role tag, no ``<think>`` in the generation
prompt). The real openai client and httpx talk to a real serve.py process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_process import ServerProcess

from serving.chat import ChatTemplate, prompt_opens_thinking, render_chat
from serving.parsers import parse_output

pytestmark = pytest.mark.slow  # real server processes

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-own-template"
OWN_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools -%}<|system|>\nTOOLS {{ tools | tojson }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' and 'forbidden' in m.content -%}"
    "{{ raise_exception('this template refuses a system message saying forbidden') }}"
    "{%- endif -%}"
    "<|{{ m.role }}|>\n{{ m.content }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '\\n<think></think>' }}{%- endif -%}"
    "{%- endif -%}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("own-template") / MODEL)
    (path / "chat_template.jinja").write_text(OWN_TEMPLATE)  # wins over tokenizer_config.json's template
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(["--model", str(checkpoint), "--max-model-len", "512", "--num-kv-blocks", "40",
                        "--kv-block-size", "16"], env={"GLM_BACKEND": "cpu"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


def count(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_startup_line_and_models_name_the_checkpoint_template(server, client):
    assert "chat template: checkpoint chat_template.jinja" in server.output()
    body = httpx.get(server.url + "/v1/models").json()
    assert body["data"][0]["chat_template"] == "checkpoint chat_template.jinja"
    assert client.models.list().data[0].model_extra["chat_template"] == "checkpoint chat_template.jinja"


@pytest.mark.parametrize("thinking", [None, False])
def test_chat_is_rendered_with_the_checkpoint_template(client, tokenizer, thinking):
    own = ChatTemplate(source="own", source_text=OWN_TEMPLATE)
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    prompt = own.render(MESSAGES, None, kwargs)
    assert prompt.endswith("<|assistant|>" if thinking is None else "<|assistant|>\n<think></think>")
    extra = {} if thinking is None else {"chat_template_kwargs": kwargs}
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                         extra_body=extra)
    assert out.usage.prompt_tokens == count(tokenizer, prompt)
    assert out.usage.prompt_tokens != count(tokenizer, render_chat(MESSAGES, **kwargs))  # not the built-in
    raw = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    expected = parse_output(raw, prompt_opens_thinking(prompt))  # this prompt does not open <think>
    assert (out.choices[0].message.content or "") == expected.content
    assert (getattr(out.choices[0].message, "reasoning_content", None) or "") == expected.reasoning


def test_tool_choice_none_keeps_the_tools_in_the_prompt(client, tokenizer):
    def prompt_tokens(**extra):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES[1:], max_tokens=1, **extra
                                              ).usage.prompt_tokens

    with_tools = prompt_tokens(tools=TOOLS)
    assert with_tools == prompt_tokens(tools=TOOLS, tool_choice="none") > prompt_tokens()
    own = ChatTemplate(source="own", source_text=OWN_TEMPLATE)
    assert with_tools == count(tokenizer, own.render(MESSAGES[1:], TOOLS))


def test_a_template_that_refuses_the_request_is_a_400_naming_the_problem(server, client):
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "forbidden words"},
                                                          {"role": "user", "content": "hi"}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    assert "refuses a system message saying forbidden" in err["message"] and "\n" not in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=4)
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_template_flag_overrides_the_checkpoint(checkpoint, tmp_path):
    override = tmp_path / "override.jinja"
    override.write_text("{% for m in messages %}<|user|>{{ m.content }}{% endfor %}<|assistant|><think>")
    with ServerProcess(["--model", str(checkpoint), "--chat-template", str(override), "--max-model-len", "256",
                        "--num-kv-blocks", "20", "--kv-block-size", "16"], env={"GLM_BACKEND": "cpu"}) as proc:
        assert f"chat template: --chat-template {override}" in proc.output()
        assert httpx.get(proc.url + "/v1/models").json()["data"][0]["chat_template"] == f"--chat-template {override}"
        out = httpx.post(proc.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        }).json()
        # the prompt ends in <think>: the output is reported as reasoning
        assert out["usage"]["completion_tokens"] >= 1 and out["choices"][0]["message"]["reasoning_content"]


def run_serve(args, tmp_path):
    env = {**os.environ, "HWLAYER_CACHE": str(tmp_path / "cache"), "GLM_BACKEND": "cpu"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(REPO / "serve.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_unusable_chat_template_exits_2_with_one_line(checkpoint, tmp_path):
    missing = run_serve(["--chat-template", str(tmp_path / "nope.jinja")], tmp_path)
    assert missing.returncode == 2 and "--chat-template" in missing.stderr and "no such file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    result = run_serve(["--model", str(checkpoint), "--chat-template", str(broken)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.jinja: not a valid Jinja template" in lines[0], result.stderr


def test_a_checkpoint_without_a_template_gets_the_builtin_renderer(tmp_path):
    from model.tiny import make_tiny_checkpoint
    from serving.chat import BUILTIN_SOURCE, load_chat_template

    path = make_tiny_checkpoint(tmp_path / "no-template")
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert load_chat_template(path).source == "checkpoint tokenizer_config.json"
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(path).source == BUILTIN_SOURCE
