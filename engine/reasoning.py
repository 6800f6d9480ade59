"""A reasoning model's thinking, split from its answer (`server.reasoning_parser`; vLLM's and SGLang's
`--reasoning-parser`): chat responses carry the thinking as `reasoning_content` and the answer as `content`.

Thinking sits between <think> and </think>. Two conventions for where it starts:
  "qwen3": the model opens it itself (Qwen3, QwQ); a reply that does not begin with <think> (Qwen3 with
           `chat_template_kwargs: {"enable_thinking": false}`) is all answer;
  "deepseek_r1": the chat template opens it in the prompt, so the reply starts inside it (a leading <think> is
           tolerated).
Whitespace after </think> is dropped. A reply that ends before </think> (out of tokens while thinking) is all
thinking. `split` is monotone in the text: the parts of a prefix are prefixes of the whole text's parts, so a
stream can send each part's growth as it comes (holding back a tail that may still become a tag).
"""
from __future__ import annotations

from engine.output import partial_stop_len

START, END = "<think>", "</think>"
PARSERS = ("none", "qwen3", "deepseek_r1")


def split(text: str, parser: str, finished: bool = True) -> tuple[str | None, str]:
    """(reasoning, content) of a reply so far: reasoning None when the reply has no thinking. With finished False,
    a tail that may still become a tag is held back (in neither part)."""
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
