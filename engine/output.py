"""A request's output as the engine streams it: tokens -> incremental text, stop strings applied, and the
`RequestOutput` each step hands back (the text delta, the totals once finished)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable

import numpy as np

from engine.request import Sequence, Status


class OutputKind(enum.Enum):
    """Which outputs a request gets, and what their list and text fields hold.

    CUMULATIVE: one per step; `text`, `token_ids` and the logprob lists hold everything so far (copies: a step's
    cost grows with the output). DELTA: one per step; those fields hold only what the step added (`text` is
    `delta_text`; prompt logprobs come whole in the first output), so a step costs the same at any length: what a
    stream sends. FINAL: the final output only. Whatever the kind, the final output carries the totals, and the
    last `len(delta_token_ids)` entries of `token_ids` and the logprob lists are this output's tokens."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL = "final"


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request (see OutputKind); the final one (finished=True) carries the totals."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str  # all text so far (OutputKind.DELTA, before the final output: delta_text)
    token_ids: list[int]  # all generated ids so far (DELTA, before the final output: delta_token_ids)
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None  # per generated token (when asked)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # per prompt token (the first is None), when asked
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int | None] | None = None  # per prompt token, its rank under the logits before it (1: the top)
    stop_reason: str | int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    queue_s: float | None = None  # arrival to first admission into the running batch
    token_times_s: list[float] | None = None
    embedding: np.ndarray | None = None  # SamplingParams.embed: [hidden] float32, L2-normalized (no text, no tokens)
    # ... and, on a sequence classifier (LlamaConfig.num_labels), its score head's logits [num_labels] float32
    classification: np.ndarray | None = None
    # SamplingParams.return_hidden_states: [generated tokens (DELTA: this step's), hidden] float32, each the final
    # hidden state the LM head read to sample its token
    hidden_states: np.ndarray | None = None


@dataclasses.dataclass
class OutputState:
    """One request's text so far: its detokenizer, the text, what was already streamed."""

    seq: Sequence
    detok: object
    kind: OutputKind = OutputKind.CUMULATIVE
    # The text so far is "".join(head) + text: `head` keeps what no stop string can reach any more, so that a step
    # appends to a short string (appending to an attribute copies it: a step's cost would grow with the output).
    text: str = ""
    head: list[str] = dataclasses.field(default_factory=list)
    offset: int = 0  # len("".join(head)): `text` starts there
    num_ids_seen: int = 0
    num_chars_emitted: int = 0

    def update(self, now: float, finish: Callable[[Sequence, str], None]) -> RequestOutput | None:
        """The request's output after its latest tokens: new text detokenized, stop strings applied (`finish` ends a
        sequence that one ends), the tail that could still become a stop string held back. OutputKind.FINAL: None
        until it finishes, and with no stop strings nothing is done before then (the text is decoded once, at the
        end; the detokenizer gives the same text for any split of the ids)."""
        seq = self.seq
        stream = self.kind is not OutputKind.FINAL
        if not stream and not seq.params.stop and seq.status is not Status.FINISHED:
            return None
        start = self.num_ids_seen
        new_ids = seq.output_ids[start:]
        # A stop token (EOS, end of turn, stop_token_ids) ends the text without appearing in it.
        text_ids = new_ids[:-1] if seq.ended_by_token else new_ids
        stop_at = None
        if len(text_ids) > 1 and seq.params.stop:
            # Several tokens at once (accepted draft tokens): the output ends at the token that completes a stop
            # string, as it does one token per step; the tokens after it are dropped.
            for j, token in enumerate(text_ids):
                self.text += self.detok.step([token])
                stop_at = find_stop(self.text, seq.params.stop, self.num_chars_emitted - self.offset)
                if stop_at is not None:
                    if j + 1 < len(new_ids):
                        truncate_output(seq, start + j + 1)
                        new_ids = new_ids[: j + 1]  # the tokens after it were dropped
                    break
        else:
            self.text += self.detok.step(text_ids)
        self.num_ids_seen = len(seq.output_ids)
        if seq.status is Status.FINISHED:
            self.text += self.detok.flush()
        if stop_at is None:
            stop_at = find_stop(self.text, seq.params.stop, self.num_chars_emitted - self.offset)
        if stop_at is not None and seq.status is not Status.FINISHED:
            finish(seq, "stop")
        if stop_at is not None:
            index, stop = stop_at
            self.text = self.text[: index + len(stop) if seq.params.include_stop_str_in_output else index]
            seq.stop_reason = stop
        finished = seq.status is Status.FINISHED
        if not (finished or stream):
            return None
        # Hold back a tail that could still become a stop string, so streams never show it.
        visible = len(self.text) if finished else len(self.text) - partial_stop_len(self.text, seq.params.stop)
        delta = self.text[self.num_chars_emitted - self.offset : visible]
        self.num_chars_emitted = max(self.num_chars_emitted, self.offset + visible)
        if finished:
            seq.finish_s = now
        if seq.params.embed:  # the token sampled after the prompt is not an output
            delta, new_ids, visible, self.text, self.head = "", [], 0, "", []
        if finished or self.kind is OutputKind.CUMULATIVE:  # everything so far (copies)
            text = "".join([*self.head, self.text[:visible]]) if self.head else self.text[:visible]
            lo, token_ids, prompt_lo = 0, [] if seq.params.embed else list(seq.output_ids), 0
        else:  # DELTA: what this step added; the prompt's logprobs once, with the first output (its first tokens)
            lo, text, token_ids = start, delta, new_ids
            prompt_lo = 0 if start == 0 else len(seq.prompt_logprobs)
        want_lp, want_plp = seq.params.logprobs, seq.params.prompt_logprobs
        self._compact(seq.params.stop)
        return RequestOutput(
            request_id=seq.request_id,
            delta_text=delta,
            delta_token_ids=new_ids,
            finished=finished,
            finish_reason=seq.finish_reason,
            text=text,
            token_ids=token_ids,
            prompt_tokens=len(seq.prompt_ids),
            cached_tokens=seq.num_cached_prompt,
            logprobs=seq.output_logprobs[lo:] if want_lp is not None else None,
            top_logprobs=seq.output_top_logprobs[lo:] if want_lp else None,
            prompt_logprobs=seq.prompt_logprobs[prompt_lo:] if want_plp is not None else None,
            prompt_top_logprobs=seq.prompt_top_logprobs[prompt_lo:] if want_plp else None,
            prompt_ranks=seq.prompt_ranks[prompt_lo:] if want_plp is not None else None,
            stop_reason=seq.stop_reason,
            ttft_s=(seq.first_token_s - seq.arrival_s) if seq.first_token_s else None,
            queue_s=(seq.first_scheduled_s - seq.arrival_s) if seq.first_scheduled_s else None,
            e2e_s=(now - seq.arrival_s) if finished else None,
            token_times_s=list(seq.token_times_s) if finished else None,
            embedding=seq.embedding,
            classification=seq.classification,
            hidden_states=_stacked(seq.output_hidden[lo:], len(token_ids)) if seq.params.return_hidden_states else None,
        )


    def _compact(self, stops: tuple[str, ...]) -> None:
        """Moves the text no stop string can reach any more (emitted, and before the longest stop's reach) to `head`,
        once there is enough of it: each character is copied a bounded number of times, whatever the length."""
        cut = self.num_chars_emitted - self.offset - max(map(len, stops), default=0)
        if cut >= COMPACT_CHARS:
            self.head.append(self.text[:cut])
            self.text = self.text[cut:]
            self.offset += cut


COMPACT_CHARS = 4096


def _stacked(rows: list[np.ndarray], n: int) -> np.ndarray:
    """[n, hidden]: the hidden states of an output's n tokens. The rows follow the output ids one for one
    (truncate_output cuts both); only an embedding request has a row (its dropped sampled token's) past them."""
    return np.stack(rows[:n]) if rows[:n] else np.zeros((0, rows[0].shape[-1] if rows else 0), np.float32)


def truncate_output(seq: Sequence, n: int) -> None:
    """Keeps the first `n` output tokens: a stop string ended the output there, inside a run of accepted draft
    tokens. A sequence the run had already ended (a later stop token, the length limit) now ends by "stop"."""
    del seq.output_ids[n:], seq.output_logprobs[n:], seq.output_top_logprobs[n:], seq.token_times_s[n:]
    del seq.output_hidden[n:]
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
