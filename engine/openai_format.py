"""`RequestOutput`s -> OpenAI response bodies: whole responses, SSE chunks, logprobs, usage.

`kind` is "text" (/v1/completions) or "chat" (/v1/chat/completions). Choice `index` is
prompt_index * n + sample_index, as OpenAI numbers them.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

from engine.engine import RequestOutput
from engine.reasoning import ReasoningStream, split
from engine.tool_calls import ToolCallStream, ToolChoice


def usage(finals: dict[int, RequestOutput], prompts: list[list[int]], n: int) -> dict:
    """Prompt tokens count once per prompt (not per sample); cached tokens are those of each prompt's first sample."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(out.token_ids) for out in finals.values())
    cached = sum(finals[i * n].cached_tokens for i in range(len(prompts)) if i * n in finals)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class ChoiceFormatter:
    """echo (completions): per prompt, (text, token ids) put before each of its n choices (streamed: in each choice's
    first chunk); prompt_only: nothing was asked to be generated (max_tokens 0), so choices carry the echoed prompt
    only; reasoning (chat): a reasoning parser (engine/reasoning.py) that moves the thinking to `reasoning_content`."""

    def __init__(self, kind: str, token_text: Callable[[int], str], call_id: str, model: str, created: int,
                 logprobs: bool, echo: list[tuple[str, list[int]]] | None = None, n: int = 1, prompt_only: bool = False,
                 tools: ToolChoice | None = None, reasoning: str = "none", prompt_ids: list[list[int]] | None = None,
                 prompt_logprobs: tuple[list[list[int]], int] | None = None):
        self.kind = kind
        self.reasoning = reasoning if kind == "chat" else "none"
        self._streams: dict[int, ReasoningStream] = {}  # choice index -> its thinking / answer split so far
        # Chat with tools that may be called: a reply's tool calls (streamed: each choice's ToolCallStream).
        self.tools = tools if tools is not None and tools.active else None
        self._tool_streams: dict[int, ToolCallStream] = {}
        self.token_text = token_text
        self.id, self.model, self.created = call_id, model, created
        self.logprobs = logprobs
        self.echo, self.n, self.prompt_only = echo, n, prompt_only
        self._offsets: dict[int, int] = {}  # choice index -> chars streamed so far (completions text_offset)
        self._echoed: set[int] = set()  # streamed choices whose prompt has been sent
        # vLLM's return_token_ids: each prompt's ids, and choices (chunks) carry their generated ids
        self.prompt_ids = prompt_ids
        # vLLM's prompt_logprobs: (each prompt's ids, k); completions' choices, or the chat response, carry them
        self.prompt_logprobs = prompt_logprobs

    def final(self, out: RequestOutput) -> RequestOutput:
        """The final output as the response reports it (with max_tokens 0, the one token run for it is dropped)."""
        if not self.prompt_only:
            return out
        return dataclasses.replace(out, text="", token_ids=[], finish_reason="length", stop_reason=None,
                                   logprobs=[] if out.logprobs is not None else None,
                                   top_logprobs=[] if out.top_logprobs is not None else None)

    # ------------------------------------------------------------------------------ whole
    def choice(self, index: int, out: RequestOutput) -> dict:
        choice = self._choice(index, out)
        if self.prompt_logprobs is not None and self.kind == "text":
            choice["prompt_logprobs"] = self._prompt_logprobs(index, out)
        return _with_hidden(choice, out, len(out.token_ids))

    def _choice(self, index: int, out: RequestOutput) -> dict:
        if self.echo is not None:
            return self._with_ids(self._echo_choice(index, out), index, out.token_ids, True)
        lp = self._logprobs(index, out, 0) if self.logprobs else None
        if self.kind == "chat":
            message, finish = self._message(out)
            choice = {"index": index, "message": {"role": "assistant", **message}, "logprobs": lp,
                      "finish_reason": finish, "stop_reason": out.stop_reason}
        else:
            choice = {"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason}
        return self._with_ids(choice, index, out.token_ids, True)

    def _with_ids(self, choice: dict, index: int, ids: list[int], first: bool) -> dict:
        """return_token_ids: the choice's generated ids (streamed: this chunk's); a completion's first chunk (or whole
        choice) also has its prompt's ids (a chat's are on the response, or its first chunk)."""
        if self.prompt_ids is not None:
            choice["token_ids"] = list(ids)
            if first and self.kind == "text":
                choice["prompt_token_ids"] = self.prompt_ids[index // self.n]
        return choice

    def response(self, choices: list[dict], usage_: dict, finals: dict[int, RequestOutput] | None = None) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        response = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                    "usage": usage_}
        if self.prompt_ids is not None and self.kind == "chat":
            response["prompt_token_ids"] = self.prompt_ids[0]
        if self.prompt_logprobs is not None and self.kind == "chat" and finals:
            response["prompt_logprobs"] = self._prompt_logprobs(0, finals[min(finals)])
        return response

    def _prompt_logprobs(self, index: int, out: RequestOutput) -> list[dict | None]:
        """vLLM's prompt_logprobs of choice `index`'s prompt: None for the first token, then per position a dict from
        token id to {logprob, rank, decoded_token} holding the prompt's token and the k most likely ones."""
        prompts, k = self.prompt_logprobs
        prompt = prompts[index // self.n]
        entries: list[dict | None] = [None]
        for pos in range(1, len(prompt)):
            token = prompt[pos]
            entry = {str(token): self._logprob_entry(token, out.prompt_logprobs[pos], out.prompt_ranks[pos])}
            for rank, (t, lp) in enumerate(out.prompt_top_logprobs[pos][:k] if k else (), 1):
                entry.setdefault(str(t), self._logprob_entry(t, lp, rank))
            entries.append(entry)
        return entries

    def _logprob_entry(self, token: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.token_text(token)}

    def _message(self, out: RequestOutput) -> tuple[dict, str | None]:
        """A finished chat reply as message fields and finish reason: the thinking apart with a reasoning parser, tool
        calls (read from the answer) when the tools say so."""
        thinking, text = split(out.text, self.reasoning) if self.reasoning != "none" else (None, out.text)
        fields = {"reasoning_content": thinking} if thinking is not None else {}
        if self.tools is None or out.finish_reason != "stop":
            return {"content": text, **fields}, out.finish_reason
        try:
            content, calls = self.tools.parse(text)
        except (ValueError, KeyError, TypeError):  # not the calls it should be: say what was written
            return {"content": text, **fields}, out.finish_reason
        if not calls:
            return {"content": content, **fields}, out.finish_reason
        return {"content": content, **fields, "tool_calls": [c.as_openai() for c in calls]}, "tool_calls"

    def _echo_choice(self, index: int, out: RequestOutput) -> dict:
        prompt_text, _ = self.echo[index // self.n]
        lp = self._echo_logprobs(index, out, 0) if self.logprobs else None
        return {"index": index, "text": prompt_text + out.text, "logprobs": lp, "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason}

    def _echo_logprobs(self, index: int, out: RequestOutput, start: int) -> dict:
        """Completions logprobs of the echoed prompt (the first token's is null), then of generated tokens [start:]."""
        prompt_text, prompt_ids = self.echo[index // self.n]
        self._offsets[index] = len(prompt_text)  # the completion's offsets follow the prompt
        gen = self._logprobs(index, out, start) or {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
        texts = [self.token_text(t) for t in prompt_ids]
        offsets = list(itertools.accumulate(map(len, texts[:-1]), initial=0))
        tops = None
        if out.prompt_top_logprobs is not None:
            tops = [None] + [{self.token_text(t): tlp for t, tlp in top} for top in out.prompt_top_logprobs[1:]]
            tops += gen["top_logprobs"] or [{} for _ in gen["tokens"]]
        return {"tokens": texts + gen["tokens"], "token_logprobs": list(out.prompt_logprobs) + gen["token_logprobs"],
                "top_logprobs": tops, "text_offset": offsets + gen["text_offset"]}

    def _echo_delta(self, index: int, out: RequestOutput) -> dict:
        """A streamed choice's first chunk: the prompt (and its logprobs), then what this step generated."""
        self._echoed.add(index)
        out = self.final(out)  # max_tokens 0: the token run for it is not shown
        start = len(out.token_ids) - (0 if self.prompt_only else len(out.delta_token_ids))  # this step's tokens
        lp = self._echo_logprobs(index, out, start) if self.logprobs else None
        prompt_text, _ = self.echo[index // self.n]
        text = prompt_text + ("" if self.prompt_only else out.delta_text)
        self._offsets[index] = len(text)
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
        if out.finished:
            choice["stop_reason"] = out.stop_reason
        return self._with_ids(choice, index, [] if self.prompt_only else out.delta_token_ids, True)

    # ---------------------------------------------------------------------------- streamed
    def role_delta(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, out: RequestOutput) -> dict | None:
        """The stream choice for one step's output; None when it carries nothing to show."""
        new_tokens = len(out.delta_token_ids)
        if self.echo is not None and index not in self._echoed:
            return _with_hidden(self._echo_delta(index, out), out, new_tokens)
        if self.kind == "chat":
            fields, finish = self._chat_delta(index, out)
        else:
            fields, finish = {"text": out.delta_text}, out.finish_reason
        per_token = self.logprobs or out.hidden_states is not None  # (a chunk for each token's entries)
        if not (any(fields.values()) or out.finished or (per_token and new_tokens)):
            return None
        lp = self._logprobs(index, out, len(out.token_ids) - new_tokens) if self.logprobs else None
        body = {"delta": fields} if self.kind == "chat" else fields
        choice = {"index": index, **body, "logprobs": lp, "finish_reason": finish}
        if out.finished:
            choice["stop_reason"] = out.stop_reason
        first = index not in self._offsets  # every chunk sent sets its choice's offset
        self._offsets[index] = self._offsets.get(index, 0) + len(out.delta_text)
        return _with_hidden(self._with_ids(choice, index, out.delta_token_ids, first), out, new_tokens)

    def _chat_delta(self, index: int, out: RequestOutput) -> tuple[dict, str | None]:
        """A chat step's delta fields and finish reason: the thinking apart with a reasoning parser (each part's
        growth; a tail that may still become a tag waits), tool calls as they are written when tools may be called."""
        if self.reasoning == "none" and self.tools is None:
            return ({"content": out.delta_text} if out.delta_text or not out.finished else {}), out.finish_reason
        thinking, answer = "", out.delta_text
        if self.reasoning != "none":
            thinking, answer = self._streams.setdefault(index, ReasoningStream(self.reasoning)).feed(
                out.delta_text, out.finished)
        calls, finish = [], out.finish_reason
        if self.tools is not None:
            stream = self._tool_streams.setdefault(index, ToolCallStream(self.tools))
            answer, calls = stream.feed(answer, out.finished, complete=out.finish_reason == "stop")
            if out.finished and stream.num_calls and out.finish_reason == "stop":
                finish = "tool_calls"
        delta = {k: v for k, v in (("reasoning_content", thinking), ("content", answer), ("tool_calls", calls)) if v}
        return delta, finish

    def chunk(self, choices: list[dict], include_usage: bool, usage_: dict | None = None, first: bool = False) -> dict:
        """A stream chunk; `first`: a chat's first (with return_token_ids, it carries the prompt's ids)."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        c = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if first and self.prompt_ids is not None and self.kind == "chat":
            c["prompt_token_ids"] = self.prompt_ids[0]
        if include_usage:
            c["usage"] = usage_
        return c

    # ---------------------------------------------------------------------------- logprobs
    def _logprobs(self, index: int, out: RequestOutput, start: int) -> dict | None:
        """Logprobs of generated tokens [start:] in the endpoint's format."""
        if out.logprobs is None:
            return None
        ids = out.token_ids[start:]
        lps = out.logprobs[start:]
        tops = (out.top_logprobs or [])[start:] if out.top_logprobs else [[] for _ in ids]
        texts = [self.token_text(t) for t in ids]
        if self.kind == "chat":
            return {"content": [
                {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                 "top_logprobs": [{"token": (ts := self.token_text(t)), "logprob": tlp, "bytes": list(ts.encode("utf-8"))}
                                  for t, tlp in top]}
                for s, lp, top in zip(texts, lps, tops)
            ]}
        offsets, pos = [], self._offsets.get(index, 0)
        for s in texts:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": texts,
            "token_logprobs": lps,
            "top_logprobs": [{self.token_text(t): tlp for t, tlp in top} for top in tops] if out.top_logprobs else None,
            "text_offset": offsets,
        }


def _with_hidden(choice: dict, out: RequestOutput, num_tokens: int) -> dict:
    """return_hidden_states: the choice (chunk) carries the final hidden states of its last num_tokens tokens."""
    if out.hidden_states is not None:
        choice["hidden_states"] = out.hidden_states[len(out.hidden_states) - num_tokens :].tolist()
    return choice
