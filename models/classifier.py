"""A sequence classifier's head, applied on the host to a prompt's last row after the final norm (what an embedding
request fetches), so that the compiled steps stay the language model's.

Two sources:
- a checkpoint's own `score` weight (HF `*ForSequenceClassification`: reward models, classifiers, cross-encoders);
- a language model's LM head rows for a few tokens (`model.classifier_from_token`, vLLM's name): a reranker trained to
  answer "yes" or "no" (Qwen3-Reranker, mxbai-rerank-v2, bge-reranker-v2-gemma) served as a classifier.
  `from_2_way_softmax` keeps one label, logit(true token) - logit(false token), whose sigmoid is the true token's
  probability among the two; `no_post_processing` keeps each token's logit as a label.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from models.config import LlamaConfig
from models.quant import SCALE_SUFFIX

Method = Literal["auto", "from_2_way_softmax", "no_post_processing"]


@dataclasses.dataclass(frozen=True)
class ScoreHead:
    weight: np.ndarray  # [hidden, k] float32
    labels: tuple[str, ...]  # each output's name (one for a 2-way head)
    soft_cap: float | None = None  # LM head rows: the model caps its logits (Gemma 2), c * tanh(logits / c)
    two_way: bool = False  # the one label is logit[1] - logit[0]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def __call__(self, row: np.ndarray) -> np.ndarray:
        """[hidden] -> [num_labels] float32 logits."""
        logits = np.asarray(row, np.float32) @ self.weight
        if self.soft_cap:
            logits = self.soft_cap * np.tanh(logits / self.soft_cap)
        return logits[1:] - logits[:1] if self.two_way else logits

    @classmethod
    def from_checkpoint(cls, params: dict, cfg: LlamaConfig) -> ScoreHead:
        return cls(np.asarray(params["score"], np.float32), cfg.label_names)

    def with_weights(self, params: dict, cfg: LlamaConfig, token_ids: tuple[int, ...] | None) -> ScoreHead:
        """The same head over new weights: their `score`, or their LM head's rows for `token_ids`; ValueError if they
        do not fit."""
        if token_ids is not None:
            return dataclasses.replace(self, weight=lm_head_rows(params, cfg, token_ids))
        if "score" not in params or params["score"].shape != self.weight.shape:
            have = tuple(params["score"].shape) if "score" in params else None
            raise ValueError(f"update_weights: a score head of shape {have} for a classifier whose head is "
                             f"{self.weight.shape}")
        return dataclasses.replace(self, weight=np.asarray(params["score"], np.float32))


def from_tokens(params: dict, cfg: LlamaConfig, tokens: tuple[str, ...], token_ids: tuple[int, ...],
                method: Method) -> ScoreHead:
    """A head of the LM head's rows for `token_ids` (the vocabulary entries `tokens`); method "auto": 2-way with two
    tokens (false, true), each token a label otherwise."""
    if method == "auto":
        method = "from_2_way_softmax" if len(tokens) == 2 else "no_post_processing"
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ValueError("model.classifier_method from_2_way_softmax takes two tokens (false, true), got "
                         f"{len(tokens)}: {list(tokens)}")
    two_way = method == "from_2_way_softmax"
    return ScoreHead(lm_head_rows(params, cfg, token_ids), (tokens[1],) if two_way else tuple(tokens),
                     cfg.final_soft_cap, two_way)


def lm_head_rows(params: dict, cfg: LlamaConfig, token_ids: tuple[int, ...]) -> np.ndarray:
    """[hidden, len(token_ids)] float32: the LM head's columns for those tokens, as `llama.compute_logits` applies them
    (8-bit values times their scale; Granite's logits_scaling folded in), from host or device weights."""
    ids = np.asarray(token_ids)
    name = "embed" if cfg.tie_word_embeddings else "lm_head"
    w = params[name]
    rows = np.asarray(w[ids] if cfg.tie_word_embeddings else w[:, ids].T, np.float32)  # [k, hidden]
    if name + SCALE_SUFFIX in params:  # int8 / e4m3 head: a float32 scale per vocabulary entry
        rows = rows * np.asarray(params[name + SCALE_SUFFIX], np.float32).reshape(-1)[ids][:, None]
    return np.ascontiguousarray(rows.T / cfg.logits_scaling)


def token_ids(tokenizer, tokens: tuple[str, ...]) -> tuple[int, ...]:
    """Each vocabulary entry's id (as written in the vocabulary: "yes", or a byte-level BPE's "Ġyes" for " yes");
    ValueError naming one the vocabulary lacks."""
    ids = []
    for token in tokens:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"model.classifier_from_token: {token!r} is not an entry of the model's vocabulary")
        ids.append(i)
    return tuple(ids)
