"""The output processor: token ids in, text and events out.

For each sampled token it advances the grammar matcher, detokenizes incrementally, applies the stop
conditions (stop tokens, ``stop_after_token_ids``, stop strings, a finished grammar, ``max_tokens``,
the context limit), holds back text that may still begin a stop string, and streams an
:class:`~serving.request.EngineEvent` to the request's ``on_event``. The scheduler is told (through
``release``) when a sequence finishes so that its blocks return at once. The API's parsers
(reasoning, tool calls) read the event text downstream.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .request import EngineEvent, Sequence, special_token_ids
from .sampling import TokenLogprob

log = logging.getLogger("serving.engine")


class OutputProcessor:
    """``release(seq)``: called once when a sequence finishes (the scheduler frees its blocks)."""

    def __init__(self, tokenizer: Any, *, eos_token_ids: set[int], max_model_len: int, metrics: Any = None,
                 release: Callable[[Sequence], None] = lambda seq: None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.special_ids = special_token_ids(tokenizer)
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.release = release

    def stop_ids(self, params: Any) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)

    def append_token(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None = None,
                     emit: bool = True) -> bool:
        """Add one sampled token; True when ``seq`` finished. ``emit`` False: a token of a multi-token
        step whose event the last token of the step sends."""
        p = seq.params
        seq.output_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if self.metrics:
            self.metrics.generation_tokens.inc()
            if seq.last_token_time is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        if seq.matcher is not None:
            if seq.grammar_active and not seq.matcher.consume_token(token):
                # only a grammar the engine cannot follow gets here (e.g. min_tokens banning the only way out)
                self.finish(seq, "error", error=f"structured output: {' '.join(seq.matcher.get_error().split())}")
                return True
            if not seq.grammar_active and token == p.structured.start_after:
                seq.grammar_active = True
        reason = None
        if token in self.stop_ids(p):
            reason = "stop"  # the stop token itself is not part of the text
        else:
            if not (p.skip_special_tokens and token in self.special_ids):
                seq.text += seq.detok.add(token)
            if token in p.stop_after_token_ids:
                reason = "stop"
            elif p.stop and len(seq.output_ids) >= p.min_tokens:
                start = max(0, seq.sent - max(len(s) for s in p.stop))
                hits = [(at, at + len(s)) for s in p.stop if (at := seq.text.find(s, start)) >= 0]
                if hits:
                    at, end = min(hits)
                    seq.text = seq.text[:end if p.include_stop_str_in_output else at]
                    reason = "stop"
        if reason is None and seq.grammar_active and seq.matcher.is_stopped():
            reason = "stop"  # the grammar is complete: nothing but its end may follow
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is None and seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.finish(seq, reason)
            return True
        if emit:
            self.emit_progress(seq)
        return False

    def emit_progress(self, seq: Sequence) -> None:
        """Stream the text so far, holding back what may still turn out to begin a stop string."""
        hold = max((len(s) - 1 for s in seq.params.stop), default=0)
        upto = max(seq.sent, len(seq.text) - hold)
        event = EngineEvent(text=seq.text[seq.sent:upto], prompt_tokens=len(seq.prompt_ids),
                            completion_tokens=len(seq.output_ids), logprobs=self._take_logprobs(seq))
        seq.sent = upto
        self.emit(seq, event)

    @staticmethod
    def _take_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        if seq.params.logprobs is None:
            return None
        taken, seq.pending_logprobs = seq.pending_logprobs, []
        return taken

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.release(seq)
        event = EngineEvent(text=seq.text[seq.sent:], finished=True, finish_reason=reason,
                            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), error=error,
                            logprobs=self._take_logprobs(seq))
        seq.sent = len(seq.text)
        if self.metrics:
            self.metrics.finished.labels(reason=reason).inc()
        self.emit(seq, event)

    def emit(self, seq: Sequence, event: EngineEvent) -> None:
        if not seq.sent_first_event:  # the prompt logprobs travel on the first event
            seq.sent_first_event = True
            if seq.prompt_logprobs is not None:
                event.prompt_logprobs = seq.prompt_logprobs
        try:
            seq.on_event(event)
        except Exception:  # a consumer's failure must not stop the batch
            log.exception("request %s: event callback failed", seq.request_id)
