"""The offline job's own line format (scripts/generate.py): a line's fields -> a request, a finished request -> its
output line. `LineJob` feeds lines to one engine as its batch drains; the job runs one, or one per replica
(engine.data_parallel).

Input line:  {"id", "prompt"}, {"id", "messages"} (content: a string, or text and image parts) or {"id",
             "prompt_embeds"} (a .npy or safetensors file of [tokens, hidden] rows, or one base64-encoded) and optional
             request fields (LINE_FIELDS; scripts/generate.py lists them). Output line: {"id", "text", "token_ids",
             "finish_reason", "prompt_tokens", "cached_tokens" [, "logprobs"][, "prompt_logprobs"][,
             "hidden_states"][, "reasoning_content"]}, {"id", "embedding", "prompt_tokens", "cached_tokens"} for an
             embedding, {"id", "logits", "label", "prompt_tokens", "cached_tokens"} on a sequence classifier (every
             line; "messages" through the chat template without a generation prompt: the conversation scored as it
             stands), or {"id", "error"} for a line refused.
Rerank line: {"id", "query", "documents"} -> {"id", "scores" (one per document, in their order), "prompt_tokens",
             "cached_tokens"}: POST /v1/rerank's scores (engine.scoring: a cross-encoder's relevance of each pair,
             the query a prefix every pair shares; else the cosine similarity of embeddings).
"""
from __future__ import annotations

import dataclasses
import json

from engine import prompt_embeds, scoring, structured
from engine.output import OutputKind
from engine.reasoning import keeps_special_tokens, split as split_reasoning
from engine.request import RequestError, SamplingParams, with_defaults

SAMPLING_FIELDS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "prompt_logprobs", "logit_bias",
    "min_tokens", "truncate_prompt_tokens", "stop_token_ids", "allowed_token_ids", "bad_words",
    "include_stop_str_in_output", "skip_special_tokens", "return_hidden_states",
}
LINE_FIELDS = SAMPLING_FIELDS | set(structured.FIELDS) | {"id", "prompt", "messages", "prompt_embeds", "cache_salt",
                                                           "priority", "adapter",
                                                           "embed", "chat_template_kwargs", "continue_final_message",
                                                           "query", "documents"}
RERANK_FIELDS = {"id", "query", "documents", "cache_salt", "priority", "adapter"}  # what a rerank line may carry
DEFAULT_MAX_TOKENS = 256


def parse_line(line: str, number: int) -> tuple[str | None, dict | None, str | None]:
    """-> (id, request fields, error). A line that is not a JSON object with an id gets id None."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"line {number}: not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, None, f"line {number}: expected a JSON object"
    rid = obj.get("id")
    if rid is None or not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return None, None, f"line {number}: missing or invalid 'id' (a string or integer)"
    rid = str(rid)
    unknown = sorted(set(obj) - LINE_FIELDS)
    if unknown:
        return rid, None, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(LINE_FIELDS))})"
    if "query" in obj or "documents" in obj:
        other = sorted(set(obj) - RERANK_FIELDS)
        if other:
            return rid, None, f"a rerank line ('query', 'documents') takes no {other[0]!r}"
        if not (isinstance(obj.get("query"), str) and obj["query"] and isinstance(obj.get("documents"), list)
                and obj["documents"] and all(isinstance(d, str) and d for d in obj["documents"])):
            return rid, None, "a rerank line needs 'query', a non-empty string, and 'documents', a non-empty list of them"
        return rid, obj, None
    if sum(k in obj for k in ("prompt", "messages", "prompt_embeds")) != 1:
        return rid, None, ("exactly one of 'prompt' (text), 'messages' (chat), 'prompt_embeds' (rows: a .npy or "
                           "safetensors file, or one base64-encoded) or 'query' (rerank) is required")
    if "prompt_embeds" in obj and not (isinstance(obj["prompt_embeds"], str) and obj["prompt_embeds"]):
        return rid, None, "'prompt_embeds' must be a file path or a base64 payload"
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        return rid, None, "'prompt' must be a string"
    if "messages" in obj and not (
        isinstance(obj["messages"], list)
        and obj["messages"]
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
                for m in obj["messages"])
    ):
        return rid, None, "'messages' must be a non-empty list of {role, content}: content a string or a list of parts"
    if "chat_template_kwargs" in obj and ("messages" not in obj or not isinstance(obj["chat_template_kwargs"], dict)):
        return rid, None, "'chat_template_kwargs' must be an object, with 'messages'"
    if "continue_final_message" in obj and ("messages" not in obj or not isinstance(obj["continue_final_message"], bool)):
        return rid, None, "'continue_final_message' must be true or false, with 'messages'"
    if obj.get("cache_salt") is not None and not isinstance(obj["cache_salt"], str):
        return rid, None, "'cache_salt' must be a string or null"
    return rid, obj, None


def sampling_params(obj: dict, defaults: dict | None = None) -> SamplingParams:
    """A line's SamplingParams; `defaults` (the checkpoint's recommended sampling) fill the fields it leaves out."""
    if obj.get("embed", False) is not False:
        given = sorted((SAMPLING_FIELDS | set(structured.FIELDS)) & set(obj))
        if obj["embed"] is not True or given:
            raise RequestError("'embed' must be true, and an embedding line takes no sampling fields"
                               + (f" (got {given[0]!r})" if given else ""))
        return SamplingParams.embedding()
    kwargs = with_defaults({k: obj[k] for k in SAMPLING_FIELDS if k in obj}, defaults or {})
    kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = (kwargs["stop"],)
    kwargs["structured"] = structured.from_fields(obj)
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise RequestError(str(e)) from e


def classify_params(obj: dict) -> SamplingParams:
    """A line's params on a sequence classifier (every line is classified): no sampling fields."""
    given = sorted((SAMPLING_FIELDS | set(structured.FIELDS) | {"embed"}) & set(obj))
    if given:
        raise RequestError(f"the model is a sequence classifier: a line is classified, and takes no {given[0]!r}")
    return SamplingParams.embedding()


class LineJob:
    """This job's lines on one engine: `submit` adds one (or names why not), `step` runs one engine step and returns
    the output lines of the requests it finished."""

    def __init__(self, engine, reasoning_parser: str = "none"):
        self.engine = engine
        self.reasoning_parser = reasoning_parser
        self.pending: dict[str, tuple[str, bool]] = {}  # engine request id -> (line id, the line had messages)
        self.reranks: dict[str, Rerank] = {}  # a rerank line's id -> its requests' outputs so far
        self.rerank_requests: dict[str, tuple[str, int]] = {}  # engine request id -> (rerank line id, its place)
        self._generated_before = engine.num_generated_tokens

    @property
    def streamed(self) -> int:
        """Tokens generated so far, unfinished requests included (the live rate)."""
        return self.engine.num_generated_tokens - self._generated_before

    def __len__(self) -> int:
        return len(self.pending) + len(self.rerank_requests)

    def submit(self, rid: str, obj: dict) -> str | None:
        """Adds a parsed line's request; -> None, or the error the engine refused it with."""
        engine = self.engine
        if "query" in obj:
            return self._submit_rerank(rid, obj)
        classifier = getattr(engine, "score_head", None) is not None  # every line classified: a reward model's job
        try:
            chat = {"add_generation_prompt": False} if classifier else {}  # the conversation as it stands, scored
            if "messages" in obj:
                prompt, images = engine.encode_chat(obj["messages"], **obj.get("chat_template_kwargs", {}), **chat,
                                                    continue_final_message=obj.get("continue_final_message", False))
            elif "prompt_embeds" in obj:  # (model.enable_prompt_embeds)
                prompt, images = {"prompt_embeds": prompt_embeds.read(obj["prompt_embeds"])}, []
            else:
                prompt, images = obj["prompt"], []
            params = (classify_params(obj) if classifier
                      else sampling_params(obj, getattr(engine, "sampling_defaults", None)))
            if "messages" in obj and keeps_special_tokens(self.reasoning_parser, engine.tokenizer.special_texts):
                params = dataclasses.replace(params, skip_special_tokens=False)
            engine_id = engine.add_request(prompt, params, namespace=obj.get("cache_salt"),
                                           priority=obj.get("priority", 0), adapter=obj.get("adapter"),
                                           output_kind=OutputKind.FINAL, images=images or None)
        except (RequestError, ValueError) as e:
            return str(e)
        self.pending[engine_id] = (rid, "messages" in obj)
        return None

    def _submit_rerank(self, rid: str, obj: dict) -> str | None:
        """A rerank line's requests: one per pair on a cross-encoder, else one per distinct text (its embedding)."""
        engine = self.engine
        try:
            cross = scoring.cross_encodes(getattr(engine, "score_head", None))
        except ValueError as e:
            return str(e)
        query, documents = obj["query"], obj["documents"]
        prompts = ([engine.pair_format.prompt(query, d) for d in documents] if cross
                   else list(scoring.distinct([(query, d) for d in documents]).values()))  # each text embedded once
        added = []
        for i, prompt in enumerate(prompts):
            try:
                added.append(engine.add_request(prompt, SamplingParams.embedding(), namespace=obj.get("cache_salt"),
                                                priority=obj.get("priority", 0), adapter=obj.get("adapter"),
                                                output_kind=OutputKind.FINAL))
            except (RequestError, ValueError) as e:
                for engine_id in added:  # the line is refused whole
                    engine.abort(engine_id)
                which = f"document {i}" if cross else "the query" if i == 0 else f"document {documents.index(prompt)}"
                return f"{which}: {e}"
        self.rerank_requests |= {engine_id: (rid, i) for i, engine_id in enumerate(added)}
        self.reranks[rid] = Rerank(query, documents, cross, len(added))
        return None

    def step(self) -> list[dict]:
        records = []
        for r in self.engine.step():
            if r.finished and r.request_id in self.rerank_requests:
                rid, i = self.rerank_requests.pop(r.request_id)
                if (record := self.reranks[rid].add(i, r, rid)) is not None:
                    del self.reranks[rid]
                    records.append(record)
                continue
            if not r.finished or r.request_id not in self.pending:
                continue
            rid, chat = self.pending.pop(r.request_id)
            if r.classification is not None:
                label = self.engine.score_head.labels[int(r.classification.argmax())]
                records.append({"id": rid, "logits": r.classification.tolist(), "label": label,
                                "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens})
                continue
            if r.embedding is not None:
                records.append({"id": rid, "embedding": r.embedding.tolist(), "prompt_tokens": r.prompt_tokens,
                                "cached_tokens": r.cached_tokens})
                continue
            record = {"id": rid, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                      "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens}
            if chat and self.reasoning_parser != "none":
                thinking, record["text"] = split_reasoning(r.text, self.reasoning_parser)
                record["reasoning_content"] = thinking
            if r.logprobs is not None:
                record["logprobs"] = r.logprobs
            if r.prompt_logprobs is not None:
                record["prompt_logprobs"] = r.prompt_logprobs
            if r.hidden_states is not None:  # [tokens][hidden]
                record["hidden_states"] = r.hidden_states.tolist()
            records.append(record)
        return records


def count(record: dict, totals: dict) -> None:
    """Adds an output line to the job's totals (requests, errors, prompt / cached / generated tokens)."""
    if "error" in record:
        totals["errors"] += 1
        return
    totals["requests"] += 1
    totals["prompt"] += record["prompt_tokens"]
    totals["cached"] += record["cached_tokens"]
    totals["generated"] += len(record.get("token_ids", ()))


@dataclasses.dataclass
class Rerank:
    """A rerank line's requests as they finish: one per pair (a cross-encoder's), or one per distinct text (their
    embeddings: the query, then the documents not already asked for)."""
    query: str
    documents: list[str]
    cross: bool
    num: int  # requests
    outs: dict = dataclasses.field(default_factory=dict)  # request's place -> its final output

    def add(self, i: int, out, rid: str) -> dict | None:
        """Takes request i's output; -> the line's record once every one is in."""
        self.outs[i] = out
        if len(self.outs) < self.num:
            return None
        outs = [self.outs[j] for j in range(self.num)]
        if self.cross:
            scores = [scoring.relevance(o.classification) for o in outs]
        else:
            pairs = [(self.query, d) for d in self.documents]
            scores = scoring.cosines(pairs, dict(zip(scoring.distinct(pairs), (o.embedding for o in outs))))
        return {"id": rid, "scores": scores, "prompt_tokens": sum(o.prompt_tokens for o in outs),
                "cached_tokens": sum(o.cached_tokens for o in outs)}
