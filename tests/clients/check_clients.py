"""Third-party clients against a running server: ``python check_clients.py URL MODEL`` in a venv holding
langchain-openai and litellm (``make test-clients`` builds one; they are not project dependencies).
Each check prints one line; any failure raises. What they send is what broke before issue 23:
``reasoning_effort``, the Responses API, null fields, structured output from a pydantic schema."""

import json
import sys
from typing import Literal

from pydantic import BaseModel


class Verdict(BaseModel):
    ok: bool
    score: int


def langchain_checks(url: str, model: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=url + "/v1", api_key="none", model=model, max_tokens=8, temperature=0,
                     reasoning_effort="low", max_retries=0)
    out = llm.invoke("Hi")
    assert isinstance(out.content, str) and out.usage_metadata["output_tokens"] == 8, out
    print("langchain ChatOpenAI.invoke (reasoning_effort): ok")
    chunks = list(llm.stream("Hi"))
    assert chunks, "no chunks"
    print("langchain ChatOpenAI.stream: ok")
    quiet = ChatOpenAI(base_url=url + "/v1", api_key="none", model=model, max_tokens=64, temperature=0,
                       reasoning_effort="none", max_retries=0)
    verdict = quiet.with_structured_output(Verdict, method="json_schema").invoke("Judge: 2+2=4")
    assert isinstance(verdict, Verdict), verdict
    print(f"langchain with_structured_output (pydantic json_schema): ok {verdict}")

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # an enum: the noise model cannot ramble in it
        """The weather in a city."""
        return "sunny"

    called = quiet.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather", called
    print("langchain bind_tools (named tool_choice): ok")
    responses = ChatOpenAI(base_url=url + "/v1", api_key="none", model=model, max_tokens=8, temperature=0,
                           use_responses_api=True, reasoning={"effort": "none"}, max_retries=0)
    out = responses.invoke("Hi")
    assert out.content is not None, out
    print("langchain ChatOpenAI(use_responses_api=True).invoke: ok")


def litellm_checks(url: str, model: str) -> None:
    import litellm

    common = dict(model="openai/" + model, api_base=url + "/v1", api_key="none")
    out = litellm.completion(**common, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
                             reasoning_effort="low")
    assert out.usage.completion_tokens == 8, out
    print("litellm.completion (reasoning_effort): ok")
    pieces = [c for c in litellm.completion(**common, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            stream=True)]
    assert pieces, "no chunks"
    print("litellm.completion stream: ok")
    text = litellm.text_completion(**common, prompt="Once upon", max_tokens=4, temperature=0)
    assert text.choices[0].text is not None, text
    print("litellm.text_completion: ok")
    resp = litellm.responses(**common, input="Hi", max_output_tokens=8, reasoning={"effort": "none"})
    assert resp.output, resp
    print("litellm.responses: ok")


if __name__ == "__main__":
    url, model = sys.argv[1], sys.argv[2]
    langchain_checks(url, model)
    litellm_checks(url, model)
    print(json.dumps({"clients": "ok"}))
