"""What one request is, shared by the scheduler, the runner and the output processor.

:class:`SamplingParams` (what the API asks for), :class:`EngineEvent` (what the request hears
back), :class:`Sequence` (the request's state inside the engine: tokens, KV blocks, progress,
detokenizer, sampling generator). Only the engine thread touches a :class:`Sequence` once it is
submitted.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .sampling import TokenLogprob
from .structured import GrammarSpec

# GLM markup the reasoning and tool-call parsers read: kept in the text when special tokens are skipped
# (GLM's own tokenizer does not mark them special; the other added tokens, e.g. <sop>, are dropped).
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                 "</arg_value>")


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that ``skip_special_tokens`` drops from the text: the tokenizer's special added tokens but GLM markup."""
    decoder = getattr(tokenizer, "get_added_tokens_decoder", None)
    if decoder is None:
        return set()
    return {i for i, tok in decoder().items() if tok.special and tok.content not in MARKUP_TOKENS}


@dataclass
class SamplingParams:
    """One sequence's generation parameters (the API maps OpenAI/vLLM fields here; see serving/sampling.py
    for the processors). ``skip_special_tokens`` defaults to False at this level (the engine's text is the
    raw decode); the HTTP API defaults it to True as OpenAI and vLLM do."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely
    # None: none; k >= 0: each prompt token's logprob and the k most likely alternatives at its position
    # (the first prompt token has none: None in its place), delivered on the request's first event
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = False
    include_stop_str_in_output: bool = False
    stop_after_token_ids: list[int] = field(default_factory=list)  # end generation, keeping the token's text
    structured: GrammarSpec | None = None  # grammar-constrained decoding (serving/structured.py)

    @property
    def needs_processing(self) -> bool:
        """Whether any logits processor (serving/sampling.py) applies."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or (self.min_p > 0 and self.temperature > 0))


@dataclass
class EngineEvent:
    """What a request learns after a step: new text (and token ids), and whether it is finished."""

    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token generated since the last event, when asked for
    # one per prompt token (None for the first), on the request's first event only, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None


class IncrementalDetokenizer:
    """Text of a growing id list, produced piece by piece without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""  # an incomplete UTF-8 sequence: wait for the next token


_request_counter = itertools.count()


class Sequence:
    """One request's state; owned by the engine thread once submitted."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[EngineEvent], None],
                 tokenizer: Any, device: torch.device, request_id: str | None = None) -> None:
        self.request_id = request_id or f"seq-{next(_request_counter)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.on_event = on_event
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose KV is in the cache
        self.block_hashes: list[bytes] = []  # prefix-cache hash chain of the full blocks of ``tokens``
        self.num_registered = 0  # leading blocks registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = ""  # output text so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` already handed to the consumer
        self.finished = False
        self.counted_prompt = False
        self.matcher = params.structured.new_matcher() if params.structured is not None else None
        self.grammar_active = params.structured is not None and params.structured.start_after is None
        self.pending_logprobs: list[TokenLogprob] = []
        # prompt logprobs found so far, one per prompt token (the first None); sent on the first event
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.sent_first_event = False
        self.num_preemptions = 0  # times this sequence was preempted (recomputed)
        # speculative decoding: draft tokens proposed for the next verify step (not yet in ``output_ids``)
        self.draft_ids: list[int] = []
        self.dp_rank: int | None = None  # data-parallel attention: the rank chosen at admission
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """``tokens[start:start + n]`` without building the whole list (prompts can be long)."""
        P = len(self.prompt_ids)
        if start + n <= P:
            return self.prompt_ids[start:start + n]
        if start >= P:
            return self.output_ids[start - P:start - P + n]
        return self.prompt_ids[start:] + self.output_ids[:start + n - P]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
