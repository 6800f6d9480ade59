"""Reasoning parsers (engine/reasoning.py): thinking apart from the answer, the same whether the reply comes whole or
streamed in any pieces."""
from __future__ import annotations

import random

import pytest

from engine.reasoning import ReasoningStream, split

CASES = {
    "qwen3": [
        ("<think>plan it</think>\n\nThe answer.", ("plan it", "The answer.")),
        ("\n<think>\nsteps\n</think>done", ("\nsteps\n", "done")),
        ("No thinking here.", (None, "No thinking here.")),  # enable_thinking false
        ("<think>ran out of tokens while thin", ("ran out of tokens while thin", "")),
        ("<think></think>", ("", "")),
        ("<thi", (None, "<thi")),  # a finished reply that only looks like the tag's start is an answer
    ],
    "deepseek_r1": [
        ("plan it</think>\n\nThe answer.", ("plan it", "The answer.")),
        ("<think>plan</think>ok", ("plan", "ok")),  # the model repeated the opening tag
        ("still thinking", ("still thinking", "")),
        ("", ("", "")),
    ],
}


@pytest.mark.parametrize("parser", list(CASES))
def test_whole_replies(parser):
    for text, want in CASES[parser]:
        assert split(text, parser) == want, text


@pytest.mark.parametrize("seed", range(30))
def test_any_streamed_pieces_add_up_to_the_whole_reply_and_never_show_a_partial_tag(seed):
    rng = random.Random(seed)
    parser = rng.choice(list(CASES))
    text, _ = rng.choice(CASES[parser])
    text += rng.choice(["", " more", "</think>x", "<"])
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 8)))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    stream, thinking, answer = ReasoningStream(parser), "", ""
    for i, piece in enumerate(pieces):
        t, a = stream.feed(piece, finished=i == len(pieces) - 1)
        assert "</think>" not in t + a and not (t + a).endswith(("</", "</th")) or i == len(pieces) - 1
        thinking, answer = thinking + t, answer + a
    want_thinking, want_answer = split(text, parser)
    assert (thinking, answer) == (want_thinking or "", want_answer), (parser, pieces)


# gpt-oss's harmony replies, as the server decodes them (special tokens kept); <|return|> ends the reply as a stop token
HARMONY = [
    ("<|channel|>analysis<|message|>User wants the capital.<|end|><|start|>assistant<|channel|>final<|message|>Paris.",
     ("User wants the capital.", "Paris.")),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>"
     "<|start|>assistant<|channel|>final<|message|>c", ("a\n\nb", "c")),  # thoughts joined by a blank line
    ("<|channel|>final<|message|>No thinking.", (None, "No thinking.")),
    ("Plain text, no header.", (None, "Plain text, no header.")),
    ("<|channel|>analysis<|message|>ran out while thin", ("ran out while thin", "")),
    ("<|channel|>analysis<|message|>weather?<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
     '<|constrain|>json<|message|>{"city": "Paris"}<|call|>',
     ("weather?", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')),
    ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant to=functions.lookup<|channel|>commentary"
     ' json<|message|>{"q": 1}<|call|>',  # a preamble, then a call whose recipient comes with the role
     (None, 'Let me check.<tool_call>{"name": "lookup", "arguments": {"q": 1}}</tool_call>')),
    ("<|channel|>final<|message|>x<|end|><|start|>assistant<|chan", (None, "x")),  # a header cut off: dropped
]


def test_harmony_whole_replies():
    for text, want in HARMONY:
        assert split(text, "gpt_oss") == want, text


@pytest.mark.parametrize("seed", range(30))
def test_harmony_streamed_in_any_pieces_adds_up_and_never_shows_a_marker(seed):
    rng = random.Random(seed)
    text, _ = rng.choice(HARMONY)
    text += rng.choice(["", "<|end|><|start|>assistant<|channel|>final<|message|> more", "<|"])
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 12))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    stream, thinking, answer = ReasoningStream("gpt_oss"), "", ""
    for i, piece in enumerate(pieces):
        t, a = stream.feed(piece, finished=i == len(pieces) - 1)
        assert "<|" not in t + a or i == len(pieces) - 1, (pieces, t, a)
        thinking, answer = thinking + t, answer + a
    want_thinking, want_answer = split(text, "gpt_oss")
    assert (thinking, answer) == (want_thinking or "", want_answer), pieces


def test_special_tokens_stay_where_a_parser_reads_them():
    """Harmony's markers always; <think> for a reasoning parser and <tool_call> for a reply with tools only where the
    tokenizer makes them special tokens (GLM-4.5's), which decoding would otherwise drop; Qwen3's are plain text."""
    from engine.reasoning import keeps_special_tokens

    glm = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "<|user|>"}
    assert keeps_special_tokens("gpt_oss")
    assert keeps_special_tokens("qwen3", glm) and not keeps_special_tokens("none", glm)
    assert keeps_special_tokens("none", glm, tools=True) and not keeps_special_tokens("none", {"<|user|>"}, tools=True)
    assert not keeps_special_tokens("qwen3", {"<|im_start|>", "<|im_end|>"}, tools=True)  # Qwen3: tags are text
    assert keeps_special_tokens("deepseek_r1", {"<｜tool▁call▁begin｜>", "<｜tool▁sep｜>"}, tools=True)
    mistral = {"[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"}  # tekken's control tokens
    assert keeps_special_tokens("none", mistral, tools=True) and not keeps_special_tokens("none", mistral)
