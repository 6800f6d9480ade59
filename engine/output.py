"""A request's output as the engine streams it: tokens -> incremental text, stop strings applied, and the
`RequestOutput` each step hands back (the text delta, the totals once finished)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from engine.request import Sequence, Status


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request; the final one (finished=True) carries the totals."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str  # all text so far
    token_ids: list[int]  # all generated ids so far
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None  # per generated token (when asked)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # per prompt token (the first is None), when asked
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_reason: str | int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    queue_s: float | None = None  # arrival to first admission into the running batch
    token_times_s: list[float] | None = None
    embedding: np.ndarray | None = None  # SamplingParams.embed: [hidden] float32, L2-normalized (no text, no tokens)


@dataclasses.dataclass
class OutputState:
    """One request's text so far: its detokenizer, the text, what was already streamed."""

    seq: Sequence
    detok: object
    stream: bool = True  # False: only the final output is wanted (None before it)
    text: str = ""
    num_ids_seen: int = 0
    num_chars_emitted: int = 0

    def update(self, now: float, finish: Callable[[Sequence, str], None]) -> RequestOutput | None:
        """The request's output after its latest tokens: new text detokenized, stop strings applied (`finish` ends a
        sequence that one ends), the tail that could still become a stop string held back. Not streamed: None until
        it finishes, and with no stop strings nothing is done before then (the text is decoded once, at the end;
        the detokenizer gives the same text for any split of the ids)."""
        seq = self.seq
        if not self.stream and not seq.params.stop and seq.status is not Status.FINISHED:
            return None
        new_ids = seq.output_ids[self.num_ids_seen :]
        # A stop token (EOS, end of turn, stop_token_ids) ends the text without appearing in it.
        text_ids = new_ids[:-1] if seq.ended_by_token else new_ids
        stop_at = None
        if len(text_ids) > 1 and seq.params.stop:
            # Several tokens at once (accepted draft tokens): the output ends at the token that completes a stop
            # string, as it does one token per step; the tokens after it are dropped.
            for j, token in enumerate(text_ids):
                self.text += self.detok.step([token])
                stop_at = find_stop(self.text, seq.params.stop, self.num_chars_emitted)
                if stop_at is not None:
                    if j + 1 < len(new_ids):
                        truncate_output(seq, self.num_ids_seen + j + 1)
                    break
        else:
            self.text += self.detok.step(text_ids)
        self.num_ids_seen = len(seq.output_ids)
        if seq.status is Status.FINISHED:
            self.text += self.detok.flush()
        if stop_at is None:
            stop_at = find_stop(self.text, seq.params.stop, self.num_chars_emitted)
        if stop_at is not None and seq.status is not Status.FINISHED:
            finish(seq, "stop")
        if stop_at is not None:
            index, stop = stop_at
            self.text = self.text[:index]
            seq.stop_reason = stop
        finished = seq.status is Status.FINISHED
        if not (finished or self.stream):
            return None
        # Hold back a tail that could still become a stop string, so streams never show it.
        visible = len(self.text) if finished else len(self.text) - partial_stop_len(self.text, seq.params.stop)
        delta = self.text[self.num_chars_emitted : visible]
        self.num_chars_emitted = max(self.num_chars_emitted, visible)
        if finished:
            seq.finish_s = now
        if seq.params.embed:  # the token sampled after the prompt is not an output
            delta, new_ids, visible, self.text = "", [], 0, ""
        return RequestOutput(
            request_id=seq.request_id,
            delta_text=delta,
            delta_token_ids=new_ids,
            finished=finished,
            finish_reason=seq.finish_reason,
            text=self.text[:visible],
            token_ids=[] if seq.params.embed else list(seq.output_ids),
            prompt_tokens=len(seq.prompt_ids),
            cached_tokens=seq.num_cached_prompt,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            top_logprobs=list(seq.output_top_logprobs) if seq.params.logprobs else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
            prompt_top_logprobs=list(seq.prompt_top_logprobs) if seq.params.prompt_logprobs else None,
            stop_reason=seq.stop_reason,
            ttft_s=(seq.first_token_s - seq.arrival_s) if seq.first_token_s else None,
            queue_s=(seq.first_scheduled_s - seq.arrival_s) if seq.first_scheduled_s else None,
            e2e_s=(now - seq.arrival_s) if finished else None,
            token_times_s=list(seq.token_times_s) if finished else None,
            embedding=seq.embedding,
        )


def truncate_output(seq: Sequence, n: int) -> None:
    """Keeps the first `n` output tokens: a stop string ended the output there, inside a run of accepted draft
    tokens. A sequence the run had already ended (a later stop token, the length limit) now ends by "stop"."""
    del seq.output_ids[n:], seq.output_logprobs[n:], seq.output_top_logprobs[n:], seq.token_times_s[n:]
    seq.ended_by_token = False
    if seq.status is Status.FINISHED:
        seq.finish_reason = "stop"
    else:
        seq.num_computed = min(seq.num_computed, seq.num_tokens)  # K/V of the kept tokens only


def find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """Earliest stop string in text[start - longest stop:] -> (index, stop)."""
    if not stops:
        return None
    lo = max(0, start - max(map(len, stops)))
    hits = [(i, s) for s in stops if (i := text.find(s, lo)) >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
