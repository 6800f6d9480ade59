"""Structured outputs: JSON schema, any JSON object, regex, choice and Lark grammars, enforced token by token.

llguidance (the grammar engine vLLM and SGLang also use) compiles the constraint into a matcher per request
and computes, before each sampling step, a bitmask of the tokens that keep the text inside the language
(`[rows, ceil(vocab / 32)]` int32, bit t % 32 of word t // 32). The mask travels with the sampling inputs;
the sampler drops the other tokens on the device. After the token is known the matcher consumes it; a
matcher that can go no further ends the request ("stop"), and an end token is allowed exactly where the
text is complete.

llguidance is imported on the first structured request, so engines that never see one never load it.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import numpy as np

from engine import speculative
from engine.request import RequestError, StructuredOutput
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# JSON is generated compactly: with free whitespace allowed, a weak model can fill the budget with blanks.
JSON_OPTIONS = {"whitespace_flexible": False}


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class Grammars:
    """Compiles constraints into matchers and fills token masks for one model's tokenizer and vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits) width; ids past the tokenizer's are never allowed
        self._ll_tokenizer = None
        self._executor = None

    def _ll(self):
        if self._ll_tokenizer is None:
            import llguidance

            tok = self._tokenizer
            eos = sorted(tok.stop_ids)
            source = tok.hf_json()
            if source is None:
                source = llguidance.TokenizerWrapper(_PieceTokenizer(tok, eos))
            self._ll_tokenizer = llguidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=eos)
            self._executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def matcher(self, so: StructuredOutput):
        """A fresh matcher for `so`; RequestError naming the problem when the constraint does not compile."""
        from llguidance import LLMatcher

        try:
            grammar = _grammar(so, self._tokenizer.special_texts)
        except Exception as e:  # a schema that is not JSON (ValueError), or not an object
            raise RequestError(f"structured output ({so.kind}): {e}") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._ll())
        if is_error:
            raise RequestError(f"structured output ({so.kind}): {messages[0].strip()}")
        matcher = LLMatcher(self._ll(), grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"structured output ({so.kind}): {matcher.get_error()}")
        return matcher

    def masks(self, matchers: list[tuple[Any, int]], num_rows: int,
              drafts: list[tuple[Any, list[int], list[int]]] = ()) -> np.ndarray:
        """[num_rows, words] int32: row i from matcher (m, i); rows without a matcher allow everything.
        `drafts` (speculative decoding): (m, rows, draft) fills rows[j] with m's mask after draft[:j] (j = 0..len(draft)),
        m itself left as it was."""
        from llguidance.numpy import fill_next_token_bitmask_par, fill_next_token_bitmask_par_with_draft_tokens

        self._ll()
        words = mask_words(self.vocab_size)
        mask = np.full((num_rows, words), -1, np.int32)
        if matchers:
            fill_next_token_bitmask_par(self._executor, matchers, mask)
        if drafts:
            starts = np.cumsum([0] + [len(rows) for _, rows, _ in drafts])
            buf = np.full((starts[-1], words), -1, np.int32)  # each draft's rows contiguous, as llguidance fills them
            fill_next_token_bitmask_par_with_draft_tokens(
                self._executor, [(m, int(start), list(draft)) for (m, _, draft), start in zip(drafts, starts)], buf)
            for (_, rows, _), start in zip(drafts, starts):
                mask[rows] = buf[start : start + len(rows)]
        return mask


def valid_prefix(matcher, tokens: list[int]) -> int:
    """How many of `tokens` the grammar accepts in a row from the matcher's state (the matcher does not move)."""
    return matcher.validate_tokens(tokens)


def valid_tree(matcher, tree: speculative.DraftTree) -> speculative.DraftTree:
    """A draft tree with each branch cut where the grammar stops accepting it (the matcher does not move)."""
    return speculative.build_tree([branch[: valid_prefix(matcher, branch)] for branch in tree.branches()], len(tree))


def advance(matcher, token: int) -> bool:
    """Feeds the sampled token to the matcher; True when the text is complete (the request ends)."""
    if not matcher.consume_token(token):
        # The mask only offers tokens the grammar accepts, so this is a bug or an end token after the end.
        log.warning("structured output: token %d rejected (%s); ending the request", token, matcher.get_error())
        return True
    return matcher.is_stopped()


def _grammar(so: StructuredOutput, special_texts: frozenset[str]) -> str:
    from llguidance import LLMatcher, StructTag

    if so.json is not None:
        try:
            schema = json.loads(so.json)
        except ValueError as e:
            raise ValueError(f"the schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"the schema must be a JSON object, got {type(schema).__name__}")
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if so.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if so.regex is not None:
        return LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        # Each choice as a Lark string literal (JSON string syntax), so no character needs regex escaping.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    if so.structural_tag is not None:
        # Free text whose triggers are lazy lexemes: once one is written, its tag's begin, schema and end follow.
        # A trigger that is one of the tokenizer's special tokens ("<|python_tag|>") is matched as that token.
        tags = json.loads(so.structural_tag)
        bracketed = [t["trigger"] for t in tags if t["trigger"].startswith("<") and t["trigger"].endswith(">")]
        return LLMatcher.grammar_from_lark(StructTag.to_grammar(
            [StructTag(trigger=t["trigger"], begin=t["begin"], end=t["end"],
                       grammar={**t["schema"], "x-guidance": JSON_OPTIONS}) for t in tags],
            assume_special=bool(bracketed) and all(t in special_texts for t in bracketed)))
    return LLMatcher.grammar_from_lark(so.grammar)


class _PieceTokenizer:
    """What llguidance's TokenizerWrapper needs from a tokenizer without an HF JSON (SentencePiece)."""

    def __init__(self, tokenizer: Tokenizer, eos: list[int]):
        self._tokenizer = tokenizer
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokenizer.piece_bytes()
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # tells TokenizerWrapper to pass strings
        return self._tokenizer.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------- request fields
# The request fields that carry a constraint (the server's and the offline job's).
FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def from_fields(fields: Mapping[str, Any]) -> StructuredOutput | None:
    """The constraint a request asks for, from OpenAI's `response_format` ({"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"schema": ...}}) or vLLM's `guided_json` / `guided_regex` /
    `guided_choice` / `guided_grammar`; None when it asks for none. RequestError names a malformed field."""
    given = [k for k in FIELDS if fields.get(k) is not None]
    if len(given) > 1:
        raise RequestError(f"{given[0]} and {given[1]} both constrain the output; give one")
    if not given:
        return None
    key = given[0]
    value = fields[key]
    if key == "response_format":
        if not isinstance(value, Mapping) or value.get("type") not in ("text", "json_object", "json_schema",
                                                                        "structural_tag"):
            raise RequestError('response_format: expected {"type": "text" | "json_object" | "json_schema" | '
                               '"structural_tag", ...}')
        if value["type"] == "text":
            return None
        if value["type"] == "json_object":
            return StructuredOutput(json_object=True)
        if value["type"] == "structural_tag":
            return StructuredOutput(structural_tag=dict(value))
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise RequestError('response_format: "json_schema" needs {"json_schema": {"name": ..., "schema": {...}}}')
        return StructuredOutput(json=dict(spec["schema"]))
    name = key.removeprefix("guided_")
    if name == "json" and isinstance(value, Mapping):
        value = dict(value)
    try:
        return StructuredOutput(**{name: value})
    except RequestError as e:
        raise RequestError(f"{key}: {str(e).removeprefix('structured output: ')}") from None


def structural_tags(value: Mapping) -> list[dict]:
    """response_format {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}
    (vLLM's and SGLang's) -> [{"trigger", "begin", "schema", "end"}], each structure under the longest trigger its
    begin starts with; RequestError naming what is malformed."""
    structures, triggers = value.get("structures"), value.get("triggers")
    if "format" in value and structures is None:
        raise RequestError('response_format: structural_tag takes "structures" and "triggers" (vLLM\'s and SGLang\'s '
                           'form); the "format" form is not supported')
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise RequestError('response_format: structural_tag needs "triggers", a non-empty list of non-empty strings')
    if not isinstance(structures, list) or not structures:
        raise RequestError('response_format: structural_tag needs "structures", a non-empty list of {"begin", '
                           '"schema", "end"}')
    tags = []
    for i, st in enumerate(structures):
        if not (isinstance(st, Mapping) and isinstance(st.get("begin"), str) and isinstance(st.get("end"), str)
                and isinstance(st.get("schema"), Mapping)):
            raise RequestError(f'response_format: structures[{i}] must be {{"begin": string, "schema": object, '
                               '"end": string}')
        opened_by = [t for t in triggers if st["begin"].startswith(t)]
        if not opened_by:
            raise RequestError(f"response_format: structures[{i}]'s begin {st['begin']!r} starts with none of the "
                               f"triggers {triggers}")
        tags.append({"trigger": max(opened_by, key=len), "begin": st["begin"], "schema": dict(st["schema"]),
                     "end": st["end"]})
    return tags
