"""What a user asks for (`SamplingParams`) and the engine's host-side record of one sequence (`Sequence`)."""
from __future__ import annotations

import dataclasses
import enum
import json
import time
from typing import Any, Sequence as Seq

import numpy as np

MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
    """A request the engine refuses; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, enforced token by token (exactly one field set):
    `json` a JSON schema (dict or its text), `json_object` any JSON object, `regex` a regular expression the
    whole text matches, `choice` one of these strings, `grammar` a Lark grammar (llguidance's dialect),
    `structural_tag` free text in which each tag a trigger opens is completed in its schema (response_format's
    {"structures": [{"begin", "schema", "end"}], "triggers": [...]}, kept as the JSON text of a list of {"trigger",
    "begin", "schema", "end"}: `structured.structural_tags`)."""

    json: str | None = None  # the schema as JSON text (a dict is serialized here)
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self):
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))
        if isinstance(self.structural_tag, dict):  # response_format's {"structures", "triggers"}
            from engine.structured import structural_tags

            object.__setattr__(self, "structural_tag", json.dumps(structural_tags(self.structural_tag)))
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise RequestError("structured output: choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError(f"structured output: {name} must be a non-empty string, got {value!r:.40}")
        kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise RequestError(f"structured output: set exactly one of {', '.join(_KINDS)} "
                               f"(got {', '.join(kinds) or 'none'})")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))


_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


def with_defaults(fields: dict, defaults: dict) -> dict:
    """`fields` (a request's sampling fields, None where it says nothing) with the model's `defaults` in the gaps: the
    sampling its checkpoint recommends (models.loader.sampling_defaults; vLLM's --generation-config auto)."""
    return {**fields, **{k: v for k, v in defaults.items() if fields.get(k) is None}}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # same seed + same prompt -> same output, whatever else is in the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k (<= 20)
    structured: StructuredOutput | None = None  # JSON schema / regex / choice / grammar the output must follow
    # Logprobs of the prompt's own tokens (each given those before it): None off, 0 the token's, k also the top k.
    # The prompt is then computed in full (its logits are needed), not served from the prefix cache.
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits (OpenAI)
    min_tokens: int = 0  # end tokens and stop ids cannot be sampled before this many tokens (vLLM)
    # An embedding request: the prompt's last token's final hidden state (after the final norm, L2-normalized) comes
    # back as RequestOutput.embedding and nothing is generated (max_tokens must be 1: the step's one sampled token is
    # dropped). Last-token pooling, as decoder embedding models (Qwen3-Embedding, e5-mistral) are trained.
    embed: bool = False
    # SGLang's: each output token's final hidden state, the row (after the final norm) the LM head read to sample it,
    # comes back as RequestOutput.hidden_states [tokens, hidden] float32 (probes, reward and value heads, steering).
    # Steps with such a request copy their head rows to the host.
    return_hidden_states: bool = False
    # Left truncation (vLLM's): keep only the prompt's last k tokens; -1: as many as fit before max_tokens.
    truncate_prompt_tokens: int | None = None
    # vLLM's: only these ids may be sampled (end tokens too: list them to let the output end before max_tokens)
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's: words never generated: a word's last token is banned wherever the output so far ends with its other
    # tokens (each word as written and with a leading space: tokenizers encode the two differently)
    bad_words: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # a stop string that ends the output stays in its text (vLLM)
    skip_special_tokens: bool = True  # False: special tokens the model writes appear in the text (vLLM)

    def __post_init__(self):
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        try:
            bias = tuple(sorted((int(t), float(b)) for t, b in self.logit_bias))
        except (TypeError, ValueError):
            raise RequestError("logit_bias must map token ids to numbers") from None
        if any(not -100 <= b <= 100 for _, b in bias):
            raise RequestError("logit_bias values must be in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not isinstance(self.return_hidden_states, bool):
            raise RequestError(f"return_hidden_states must be true or false, got {self.return_hidden_states!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise RequestError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise RequestError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise RequestError(f"allowed_token_ids must be a list of token ids, got {ids!r:.60}")
            if not ids:
                raise RequestError("allowed_token_ids must not be empty (nothing could be sampled)")
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(ids))))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise RequestError("bad_words must be non-empty strings")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not (k == -1 or k >= 1)):
            raise RequestError(f"truncate_prompt_tokens must be -1 or a positive integer, got {k!r}")
        if self.embed and self.max_tokens != 1:
            raise RequestError(f"an embedding request generates nothing: max_tokens must be 1, got {self.max_tokens}")

    @classmethod
    def embedding(cls) -> "SamplingParams":
        """An embedding request's params (`embed`): nothing is sampled that anyone sees."""
        return cls(max_tokens=1, temperature=0, ignore_eos=True, embed=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Sequence:
    """Host state of one request. Only the scheduler and the engine touch it; it never reaches the device."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    namespace: str | None = None  # cache_salt / adapter: caches of different namespaces never share pages
    seed: int = 0  # resolved seed (params.seed or drawn at arrival)
    priority: int = 0  # scheduler.policy "priority": lower runs first
    adapter: int = 0  # LoRA adapter index (0: the base model)
    arrival_s: float = dataclasses.field(default_factory=time.perf_counter)
    images: list = dataclasses.field(default_factory=list)  # engine.multimodal.ImageSpan of each image in the prompt

    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    output_hidden: list[np.ndarray] = dataclasses.field(default_factory=list)  # SamplingParams.return_hidden_states
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)  # [0] is None: nothing precedes it
    prompt_top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_ranks: list[int | None] = dataclasses.field(default_factory=list)  # each prompt token's rank (1: top)
    pages: list[int] = dataclasses.field(default_factory=list)  # KV pages, one reference each held by this sequence
    num_computed: int = 0  # tokens whose K/V are in `pages`
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at (first) admission
    lock_node: object = None  # radix node this sequence keeps locked (its cached path)
    matcher: Any = None  # structured output: the grammar state (an llguidance matcher) after the known tokens
    token_rules: Any = None  # allowed_token_ids / bad_words as an engine.token_rules.TokenRules
    # speculative decoding: its own tokens' index (engine.speculative.NgramIndex, or suffix decoding's SuffixIndex)
    draft_index: Any = None
    spec_misses: int = 0  # speculative decoding: verifications in a row that accepted no draft token
    spec_pause: int = 0  # ... and steps left before drafting again (backoff after misses)
    # ... and a draft tree's branch was accepted past its tokens' positions: its next step computes them again, with
    # drafts after them (Scheduler.schedule); cleared when a step computes them or the sequence stops running
    spec_redo: bool = False
    num_tree_tokens: int = 0  # tokens of this sequence inserted into / matched in the tree (page-aligned)
    state_slot: int = -1  # a model with linear attention layers: the slot of its recurrent state while it runs
    # ... the chained block hash of each of its full pages, as far as computed (SequencePages.prefix_hash), the end of
    # the cached path it left at admission (a snapshot is taken there), the hash of its latest snapshot
    block_hashes: list[int] = dataclasses.field(default_factory=list)
    snapshot_at: int = 0
    latest_snapshot: int | None = None
    window_from: int = 0  # hybrid cache: the first of `pages` whose window slot this sequence holds (engine.window_pages)
    # Disk tier: (layout key, future of {hash: page}, started) of its prompt pages being read for it; "timed out"
    disk_read: Any = None
    received_pages: int = 0  # of the pages its admission found past the tree, how many a prefill replica sent
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    ended_by_token: bool = False  # the last token is an end token or a stop id (it is not part of the text)
    stop_reason: str | int | None = None
    embedding: Any = None  # SamplingParams.embed: the L2-normalized float32 vector, once computed
    classification: Any = None  # ... and a sequence classifier's logits [num_labels]
    first_scheduled_s: float | None = None  # first admitted to the running batch (the end of its queueing)
    first_token_s: float | None = None
    finish_s: float | None = None
    token_times_s: list[float] = dataclasses.field(default_factory=list)
    # `pages` as int32 for the step's page table (`page_array`): the list it mirrors, a buffer, how much is copied
    _page_mirror: tuple = dataclasses.field(default=(None, None, 0), repr=False, compare=False)

    def page_array(self) -> np.ndarray:
        """`pages` as an int32 array, copying only the pages added since the last call: between admission and release
        a sequence's page list only grows (a new list then), so the arrays returned earlier stay true as snapshots
        (views of a buffer whose first entries never change). A long context's page table is thus not rebuilt from
        Python ints every step. (Debug mode checks that the list was not changed in place.)"""
        pages = self.pages
        mirrored, buf, n = self._page_mirror
        if mirrored is not pages or n > len(pages):
            buf, n = np.empty(max(2 * len(pages), 16), np.int32), 0
        if len(pages) > len(buf):
            buf = np.concatenate([buf[:n], np.empty(2 * len(pages) - n, np.int32)])
        if len(pages) > n:
            buf[n : len(pages)] = pages[n:]
        self._page_mirror = (pages, buf, len(pages))
        return buf[: len(pages)]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def has_pending_token(self) -> bool:
        """The last output token is a placeholder: its step is launched but not yet back (overlapped scheduling)."""
        return bool(self.output_ids) and self.output_ids[-1] < 0

    @property
    def is_prefilling(self) -> bool:
        """True until every token but the last has its K/V computed (the last one is fed at the next step)."""
        return self.num_computed < self.num_tokens - 1

    def token_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)  # sliced from the parts: a decode's one token never copies the whole history
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]


def placeholder(row: int) -> int:
    """The stand-in for the token that row `row` of the step in flight is sampling (always negative); the
    runner replaces it on the device with that step's sampled token."""
    return -1 - row


def truncate_prompt(prompt_ids: list[int], keep: int | None, max_model_len: int, max_tokens: int) -> list[int]:
    """The prompt's last `keep` tokens (`truncate_prompt_tokens`; vLLM's left truncation): -1 keeps as many as fit
    in the context before `max_tokens` new ones, None keeps all."""
    if keep == -1:
        keep = max(1, max_model_len - max_tokens)
    return prompt_ids[-keep:] if keep is not None and 0 < keep < len(prompt_ids) else prompt_ids


def validate_prompt(prompt_ids: Seq[int], vocab_size: int, max_model_len: int, max_tokens: int,
                    images: bool = False) -> None:
    """images: ids past the vocabulary are images' positions (engine.multimodal checks them)."""
    if len(prompt_ids) == 0:
        raise RequestError("prompt is empty")
    if len(prompt_ids) >= max_model_len:
        raise RequestError(
            f"prompt has {len(prompt_ids)} tokens; the context allows at most {max_model_len - 1} (model.max_model_len={max_model_len})"
        )
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab_size and not (images and int(t) >= vocab_size)]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(prompt_ids) + max_tokens > max_model_len:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {max_model_len} tokens"
        )
