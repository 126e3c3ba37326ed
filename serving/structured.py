"""Grammar-constrained decoding (structured output) with llguidance.

A request's ``response_format`` (``json_object`` / ``json_schema``) or a forced ``tool_choice``
becomes a grammar; each sequence that has one keeps an ``llguidance.LLMatcher`` that, before every
sampling step, fills a bitmask of the tokens that keep the output inside the grammar (the engine
applies it to the logits on the device) and consumes the token that was sampled. Once the grammar
is complete only end-of-sequence stays allowed, so the output always parses.

Why llguidance (not xgrammar): both are used by vLLM (``guidance`` / ``xgrammar`` backends); the
llguidance wheel has no Python dependencies and builds its tokenizer from the ``tokenizer.json``
string we already hold, while xgrammar requires ``transformers`` and ``triton`` (about 1 GB)
at install time. It is an optional dependency (``pip install 'hwlayer[structured]'``), imported
only when the first constrained request arrives; without it such requests get a 400.

JSON is generated compact (``whitespace_flexible: false``): a free-whitespace grammar lets a weak
model emit spaces forever.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

JSON_OPTIONS = {"whitespace_flexible": False}


class StructuredOutputError(ValueError):
    """A grammar that cannot be used (bad schema, engine absent); the message is one line for a 400."""


@dataclass(frozen=True)
class GrammarSpec:
    """A compiled, validated grammar (llguidance's serialized form) shared by a request's sequences.

    ``start_after``: a token id after which the grammar starts (the end of reasoning, ``</think>``,
    when thinking is on: the reasoning itself is free text); None: from the first token."""

    grammar: str
    compiler: GrammarCompiler
    start_after: int | None = None

    def new_matcher(self) -> Any:
        return self.compiler.matcher(self.grammar)


class GrammarCompiler:
    """Turns JSON schemas into grammars for one tokenizer; the llguidance tokenizer is built once, lazily."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's vocabulary)
        self.eos_token_ids = list(eos_token_ids)
        self._ll: Any = None
        self._lltok: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._ll is None:
                try:
                    import llguidance
                except ImportError:
                    raise StructuredOutputError(
                        "structured output needs the optional 'llguidance' package, not installed on this server "
                        "(pip install 'hwlayer[structured]')") from None
                self._lltok = llguidance.LLTokenizer(self.tokenizer.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_ids or None)
                self._ll = llguidance
        return self._ll

    def json_schema(self, schema: dict | None, start_after: int | None = None) -> GrammarSpec:
        """A grammar for JSON matching ``schema`` (None: any JSON object). Raises StructuredOutputError."""
        ll = self._load()
        if schema is None:
            schema = {"type": "object"}
        else:
            schema = closed_objects(schema)
        try:
            grammar = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise StructuredOutputError(f"not a usable JSON schema: {exc}") from None
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok)
        if is_error:
            raise StructuredOutputError(f"not a usable JSON schema: {one_line(messages[0])}")
        return GrammarSpec(grammar, self, start_after)

    def matcher(self, grammar: str) -> Any:
        return self._ll.LLMatcher(self._lltok, grammar, log_level=0)


def closed_objects(schema: Any) -> Any:
    """``schema`` (a copy) with ``additionalProperties: false`` on every object schema that lists ``properties``
    and says nothing about extra keys: vLLM's default grammar backend (xgrammar, strict mode) forbids them
    unless the schema allows them, so default pydantic schemas (instructor, ``parse()``) end when the object
    is complete instead of growing keys until ``max_tokens``."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else closed_objects(v)) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def fill_bitmask(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """``[len(matchers), ceil(V/32)]`` int32 allowed-token bitmasks (bit t%32 of word t//32), on the CPU."""
    words = (vocab_size + 31) // 32
    mask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        if matcher is None:
            continue
        view = mask[row]
        matcher.unsafe_compute_mask_ptr(view.data_ptr(), words * 4)
    return mask


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[rows[i], t]`` to -inf for every token ``t`` whose bit is clear in ``bitmask[i]`` (in place)."""
    V = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1  # [R, words, 32]
    allowed = bits.reshape(bits.shape[0], -1)[:, :V].bool()
    sub = logits[rows]
    logits[rows] = sub.masked_fill(~allowed, float("-inf"))
