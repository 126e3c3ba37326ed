"""docs/serving.md's compatibility table is the code's truth: every field of the request schemas and every
field the openai SDK documents has a row for its endpoint, every row names a real field, and the rows marked
``ignored`` / ``400`` are exactly the code's lists of ignored and refused fields. A field added to the code
but not the table, or to the table but not the code, fails here."""

import re
import typing
from pathlib import Path

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params as responses_params

from serving.api import CHAT_REFUSED, STREAM_OPTIONS
from serving.protocol import IGNORED_FIELDS, ChatCompletionRequest, CompletionRequest
from serving.responses import INCLUDABLE, RESPONSES_IGNORED, RESPONSES_REFUSED, ResponsesRequest

DOC = Path(__file__).resolve().parent.parent / "docs" / "serving.md"
SCHEMAS = {"chat": ChatCompletionRequest, "completions": CompletionRequest, "responses": ResponsesRequest}
SDK = {"chat": chat_params.CompletionCreateParamsBase, "completions": completion_params.CompletionCreateParamsBase,
       "responses": responses_params.ResponseCreateParamsBase}
STATUSES = ("supported", "ignored", "400")


def table_rows() -> list[tuple[str, str, str]]:
    """``(endpoint, field, status)`` per endpoint named in a row."""
    text = DOC.read_text()
    body = text[text.index("<!-- compatibility table: begin -->"):text.index("<!-- compatibility table: end -->")]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("endpoint", "---"):
            continue
        field = re.fullmatch(r"`([\w.]+)`", cells[1])
        assert field, f"docs/serving.md: field cell {cells[1]!r} is not one `name`"
        assert cells[2] in STATUSES, f"docs/serving.md: {cells[1]} status {cells[2]!r} is not one of {STATUSES}"
        for endpoint in cells[0].split(","):
            assert endpoint.strip() in SCHEMAS, f"docs/serving.md: unknown endpoint {endpoint!r}"
            rows.append((endpoint.strip(), field.group(1), cells[2]))
    return rows


ROWS = table_rows()


def documented(endpoint: str, status: str | None = None) -> set[str]:
    return {f for e, f, s in ROWS if e == endpoint and (status is None or s == status)}


def test_rows_are_unique():
    assert len(ROWS) == len(set((e, f) for e, f, _ in ROWS))


@pytest.mark.parametrize("endpoint", SCHEMAS)
def test_every_schema_field_has_a_row_and_every_row_a_field(endpoint):
    fields = set(SCHEMAS[endpoint].model_fields)
    top = {f for f in documented(endpoint) if "." not in f}
    assert fields - top == set(), f"fields of the {endpoint} schema missing from docs/serving.md's table"
    assert top - fields == set(), f"rows of docs/serving.md's table that the {endpoint} schema does not have"
    for dotted in documented(endpoint) - top:
        parent, key = dotted.split(".", 1)
        assert parent in fields, dotted
        allowed = STREAM_OPTIONS if endpoint != "responses" else ("include_obfuscation",)
        assert parent == "stream_options" and key in allowed, dotted


@pytest.mark.parametrize("endpoint", SCHEMAS)
def test_every_field_the_openai_sdk_documents_has_a_row(endpoint):
    sdk = set(typing.get_type_hints(SDK[endpoint])) | {"stream"}
    assert sdk - documented(endpoint) == set()


def test_ignored_and_refused_rows_match_the_code():
    for endpoint in ("chat", "completions"):
        fields = set(SCHEMAS[endpoint].model_fields)
        assert {f for f in documented(endpoint, "ignored") if "." not in f} == set(IGNORED_FIELDS) & fields
    assert documented("chat", "400") == set(CHAT_REFUSED)
    assert documented("completions", "400") == {"suffix"}
    assert {f for f in documented("responses", "ignored") if "." not in f} == set(RESPONSES_IGNORED)
    assert documented("responses", "400") == set(RESPONSES_REFUSED)
    assert "include_obfuscation" in STREAM_OPTIONS and INCLUDABLE == ("reasoning.encrypted_content",)
