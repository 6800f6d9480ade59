"""Pair scores (POST /v1/score and /v1/rerank, `LLM.score`), as vLLM gives them. On a sequence classifier with one
label (a cross-encoder or reranker: an HF checkpoint's score head, or `model.classifier_from_token`'s yes / no rows),
each pair is one prompt, the tokenizer's pair template over the two texts, and its score is the sigmoid of the head's
logit; pairs that share a first text (a query against many documents) share its pages in the prefix cache. On any other
model, the cosine similarity of the two texts' embeddings."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pairs(text_1: Sequence, text_2: Sequence) -> list[tuple]:
    """One first text against each second one, or text_1[i] against text_2[i]; ValueError otherwise."""
    if len(text_1) != 1 and len(text_1) != len(text_2):
        raise ValueError(f"text_1 has {len(text_1)} texts and text_2 {len(text_2)}: give one text_1, or as many as "
                         "text_2")
    return list(zip(list(text_1) * len(text_2) if len(text_1) == 1 else text_1, text_2))


def cross_encodes(score_head) -> bool:
    """Whether pairs are scored as one prompt (a classifier's); ValueError for a classifier of several labels, whose
    pair score is not defined."""
    if score_head is None:
        return False
    if score_head.num_labels != 1:
        raise ValueError(f"the served classifier has {score_head.num_labels} labels ({', '.join(score_head.labels)}); "
                         "pair scores need a cross-encoder of one label (POST /classify gives each label's logit)")
    return True


class PairFormat:
    """How a cross-encoder reads a pair as one prompt: the tokenizer's pair template over the two texts, or
    `model.score_template`, a Jinja template of `query` and `document` (a reranker's trained format, e.g.
    Qwen3-Reranker's instruction, query, document and the answer's opening), so that clients send bare texts. The
    text before the document is tokenized alone, so a query's pairs share it as a cached prefix."""

    _DOC = "\x00document\x00"  # stands for the document while the template renders
    _QUERY = "\x00query\x00"

    def __init__(self, tokenizer, template: str | None = None):
        from models.chat_template import compile_chat_template

        self.tokenizer = tokenizer
        self.template = None if template is None else compile_chat_template(template)
        if self.template is not None:
            text = self.template.render(query=self._QUERY, document=self._DOC)
            if text.count(self._DOC) != 1 or text.count(self._QUERY) != 1 or text.index(self._QUERY) > text.index(
                    self._DOC):
                raise ValueError("model.score_template must write the query once, then the document once (got "
                                 f"{text.count(self._QUERY)} query and {text.count(self._DOC)} document)")

    def prompt(self, first, second) -> list[int]:
        """A pair's token ids: two texts through the template (or the tokenizer's pair template), or two token id
        lists back to back."""
        encode = self.tokenizer.encode
        if isinstance(first, str) and isinstance(second, str):
            if self.template is None:
                return self.tokenizer.encode_pair(first, second)
            head, tail = self.template.render(query=first, document=self._DOC).split(self._DOC)
            return encode(head) + encode(second + tail, add_special_tokens=False)
        return (encode(first) if isinstance(first, str) else list(first)) + (
            encode(second, add_special_tokens=False) if isinstance(second, str) else list(second))


def distinct(pairs: list[tuple]) -> dict:
    """Each text (or token id list) of the pairs once, in order of appearance: key -> text, for embedding each once
    (`cosines` reads the vectors back by key)."""
    return {_key(t): t for pair in pairs for t in pair}


def cosines(pairs: list[tuple], vectors: dict) -> list[float]:
    """Each pair's cosine similarity, from unit embeddings by text key (`distinct`'s)."""
    return [float(np.dot(vectors[_key(a)], vectors[_key(b)])) for a, b in pairs]


def _key(text) -> str | tuple:
    return text if isinstance(text, str) else tuple(text)


def relevance(logits: np.ndarray) -> float:
    """A cross-encoder's one logit -> its score in (0, 1)."""
    return float(1 / (1 + np.exp(-float(logits[0]))))

