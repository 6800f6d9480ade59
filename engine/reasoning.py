"""A reasoning model's thinking, split from its answer (`server.reasoning_parser`; vLLM's and SGLang's
`--reasoning-parser`): chat responses carry the thinking as `reasoning_content` and the answer as `content`.

Thinking sits between <think> and </think>. Two conventions for where it starts:
  "qwen3": the model opens it itself (Qwen3, QwQ); a reply that does not begin with <think> (Qwen3 with
           `chat_template_kwargs: {"enable_thinking": false}`) is all answer;
  "deepseek_r1": the chat template opens it in the prompt, so the reply starts inside it (a leading <think> is
           tolerated).
Whitespace after </think> is dropped. A reply that ends before </think> (out of tokens while thinking) is all
thinking.

"gpt_oss": OpenAI's harmony format (gpt-oss), whose reply is messages on channels, each
`<|channel|>NAME[ to=RECIPIENT][ <|constrain|>FORMAT]<|message|>BODY`, ended by <|end|> (the next one opening with
`<|start|>assistant`), <|call|> (a tool call) or <|return|> (the last; a stop token, so not in the text). The
markers are special tokens: the server keeps them in the text of chat replies under this parser
(`skip_special_tokens` off). The `analysis` channel is the thinking (several messages joined by a blank line);
`final`, and `commentary` without a recipient (a preamble), the answer; a message to `functions.NAME` is a tool
call, handed on in the answer as `<tool_call>{"name": NAME, "arguments": BODY}</tool_call>`, the block
engine/tool_calls.py reads (whole and streamed). Text before any header is answer.

`split` is monotone in the text: the parts of a prefix are prefixes of the whole text's parts, so a stream can send
each part's growth as it comes (holding back a tail that may still become a tag or a header).
"""
from __future__ import annotations

import json
import re
from typing import Collection

from engine.output import partial_stop_len
from engine.tool_calls import CALL_MARKUP

START, END = "<think>", "</think>"
PARSERS = ("none", "qwen3", "deepseek_r1", "gpt_oss")



def keeps_special_tokens(parser: str, special: Collection[str] = (), tools: bool = False) -> bool:
    """Whether chat replies under `parser` must keep special tokens in their text: harmony's markers are special
    tokens, and so are <think> and a tool-call block's tags in some tokenizers (GLM-4.5's <tool_call>, DeepSeek's
    <｜tool▁call▁begin｜>, Mistral's [TOOL_CALLS] and [ARGS]; `special`: the tokenizer's special tokens), which a
    reasoning parser or a reply with `tools` must read (as vLLM's parsers for them ask)."""
    return (parser == "gpt_oss" or (parser != "none" and START in special)
            or (tools and any(tag in special for tag in CALL_MARKUP)))


# harmony's markers
H_START, H_CHANNEL, H_MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
H_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_OUTSIDE = (H_START, H_CHANNEL, *H_ENDS)  # what ends text outside a message
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(re.escape(H_CHANNEL) + r"\s*([^\s<]*)")


def split(text: str, parser: str, finished: bool = True) -> tuple[str | None, str]:
    """(reasoning, content) of a reply so far: reasoning None when the reply has no thinking. With finished False,
    a tail that may still become a tag is held back (in neither part)."""
    if parser == "gpt_oss":
        return _split_harmony(text, finished)
    body = text.lstrip()
    if parser == "qwen3":
        if not body.startswith(START):
            if not finished and START.startswith(body):  # the opening tag may still be arriving
                return None, ""
            return None, text
        body = body[len(START):]
    elif body.startswith(START):  # deepseek_r1: the prompt opened the thinking; tolerate the model repeating it
        body = body[len(START):]
    elif not finished and START.startswith(body):
        return "", ""
    end = body.find(END)
    if end < 0:
        return (body if finished else body[: len(body) - partial_stop_len(body, (END,))]), ""
    return body[:end], body[end + len(END):].lstrip()


def _split_harmony(text: str, finished: bool) -> tuple[str | None, str]:
    """`split` for the harmony format (module docstring)."""
    thoughts: list[str] = []
    answer: list[str] = []
    pos = 0
    while pos < len(text):
        if not text.startswith((H_START, H_CHANNEL), pos):  # outside any message: answer, up to the next header
            nxt, marker = min(((i, m) for m in _OUTSIDE if (i := text.find(m, pos)) >= 0), default=(len(text), ""))
            piece = text[pos:nxt]
            if not marker and not finished:
                piece = piece[: len(piece) - partial_stop_len(piece, _OUTSIDE)]
            answer.append(piece)
            pos = nxt + (len(marker) if marker in H_ENDS else 0)  # a stray end marker is dropped
            continue
        head_end = text.find(H_MESSAGE, pos)
        if head_end < 0:  # a header still arriving (or, finished, one the reply never completed: dropped)
            break
        header = text[pos:head_end]
        channel = _CHANNEL.search(header)
        channel = channel.group(1) if channel else ""
        recipient = _RECIPIENT.search(header)
        start = head_end + len(H_MESSAGE)
        ends = [(i, m) for m in H_ENDS if (i := text.find(m, start)) >= 0]
        end, marker = min(ends) if ends else (len(text), "")
        body = text[start:end]
        if not ends and not finished:
            body = body[: len(body) - partial_stop_len(body, H_ENDS)]
        closed = bool(ends) or finished
        if recipient is not None:  # a tool call, as the Hermes block tool_calls.py reads
            name = recipient.group(1).removeprefix("functions.")
            answer.append('<tool_call>{"name": ' + json.dumps(name) + ', "arguments": ' + body
                          + ("}</tool_call>" if closed else ""))
        elif channel == "analysis":
            thoughts.append(body)
        else:
            answer.append(body)
        pos = end + len(marker) if ends else len(text)
    return ("\n\n".join(thoughts) if thoughts else None), "".join(answer)


class ReasoningStream:
    """One streamed choice: each step's text in, the growth of each part out."""

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self._sent = (0, 0)  # characters of reasoning and content sent

    def feed(self, delta_text: str, finished: bool) -> tuple[str, str]:
        """(new reasoning, new content) to send after this step's text."""
        self.text += delta_text
        reasoning, content = split(self.text, self.parser, finished)
        reasoning = reasoning or ""
        new = reasoning[self._sent[0]:], content[self._sent[1]:]
        self._sent = (len(reasoning), len(content))
        return new
