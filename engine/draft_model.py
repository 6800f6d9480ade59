"""A draft model for speculative decoding (`speculative.method: draft_model`): loading it, and its drafts in a plan.

The draft is a small model of the target's vocabulary. It runs on the target's devices with its K/V in the same pages
(engine.runner: the cache's arrays after the target's), so everything that moves pages (the prefix tree's hits,
copy-on-write, the host and disk tiers, preemption) moves its K/V too, and every step writes both models' K/V for the
tokens it computes. Before a step, `ModelRunner.propose` runs the draft greedily from each drafting sequence's last
token for the slots the scheduler reserved; `fill_drafts` puts those tokens in the plan, which then verifies them as
it verifies n-gram drafts (engine/speculative.py): outputs are exactly plain decoding's.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from engine.config import W8A8, ConfigKeyError, EngineConfig
from engine.replica_weights import ReplicaWeights
from engine.scheduler import StepPlan
from engine import speculative, structured
from models.config import LlamaConfig
from models.loader import checkpoint_quantization, load_weights, tokenizer_source
from models.tokenizer import Tokenizer
from models.weights import cast_params

log = logging.getLogger(__name__)

PROBE_TEXT = "Speculative decoding: the draft's tokens must be the model's. 0123 \u00e9\u00e8 \u4e2d\u6587 {\"k\": [1]}"


@dataclasses.dataclass
class DraftModel:
    cfg: LlamaConfig  # as the step runs it (W8A8: quantized activations)
    weights: ReplicaWeights  # placed on the device; sleep moves them to host memory and back


def check_supported(config: EngineConfig, model_cfg: LlamaConfig) -> None:
    """ConfigKeyError naming what a drafter with K/V of its own (a draft model, an MTP layer) does not run with
    (yet)."""
    method = config.speculative.method
    if config.parallel.num_processes > 1:
        raise ConfigKeyError(f"speculative.method: {method} does not run in a multi-host replica yet "
                             "(parallel.num_processes must be 1)")


def load_draft(config: EngineConfig, dtype, tokenizer: Tokenizer, given: tuple | None, mesh,
               progress: bool) -> DraftModel:
    """The draft model of `config.speculative`: its checkpoint (`speculative.model`, quantized as
    `speculative.quantization`), or `given` = (LlamaConfig, params) in-process; a whole copy on every device of a
    tensor-parallel `mesh` (a draft is small: splitting it would add a collective per layer to each of its rounds).
    ConfigKeyError if its vocabulary is not the model's (a draft token must mean the same text to both)."""
    spec = config.speculative
    t0 = time.perf_counter()
    if given is not None:
        cfg, params = given
        params, quantization = cast_params(params, dtype), "none" if spec.quantization == "auto" else spec.quantization
    elif not spec.model:
        raise ConfigKeyError("speculative.method: draft_model needs speculative.model, the draft's checkpoint")
    else:
        check_same_vocabulary(tokenizer, Tokenizer.load(tokenizer_source(spec.model)), spec.model)
        quantization = checkpoint_quantization(spec.model) if spec.quantization == "auto" else spec.quantization
        cfg, params = load_weights(spec.model, dtype, quantization)
    if cfg.linear_layers:
        raise ConfigKeyError(f"speculative.model {spec.model or '(in-process)'} has linear attention layers: a draft "
                             "model keeps no recurrent state between its rounds (yet); take a draft with attention only")
    if cfg.num_experts:
        log.warning("speculative.model is a mixture of experts: a draft pays when it is much cheaper than the model")
    draft_config = config.replace(**{"model.path": spec.model or "in-process", "model.quantization": quantization,
                                     "model.quantize_embeddings": False, "lora.adapters": {}, "parallel.tensor": 1})
    weights = ReplicaWeights(draft_config, cfg, cfg, dtype, mesh, tokenizer, params, progress, replicate=True)
    if quantization in W8A8:
        cfg = dataclasses.replace(cfg, quantized_activations=True)
    log.info("draft model %s (%d layers, hidden %d, %s) ready in %.1f s: %d draft tokens per sequence per step",
             spec.model or "(in-process)", cfg.num_layers, cfg.hidden_size, quantization, time.perf_counter() - t0,
             spec.num_tokens)
    return DraftModel(cfg, weights)


def check_same_vocabulary(model: Tokenizer, draft: Tokenizer, path: str) -> None:
    """ConfigKeyError unless the two tokenizers have the same size and encode and decode alike (a probe text, and a
    spread of ids over the whole vocabulary)."""
    problem = None
    if model.vocab_size != draft.vocab_size:
        problem = f"{draft.vocab_size} tokens against the model's {model.vocab_size}"
    elif model.encode(PROBE_TEXT, add_special_tokens=False) != draft.encode(PROBE_TEXT, add_special_tokens=False):
        problem = "it encodes text differently"
    else:
        ids = list(range(0, model.vocab_size, max(1, model.vocab_size // 4096)))
        if [model.decode([i], skip_special_tokens=False) for i in ids] != \
                [draft.decode([i], skip_special_tokens=False) for i in ids]:
            problem = "its tokens decode to other text"
    if problem:
        raise ConfigKeyError(f"speculative.model {path}: not the model's vocabulary ({problem}); a draft model must "
                             "share the model's tokenizer")


def fill_drafts(plan: StepPlan, drafts: list[speculative.DraftTree]) -> StepPlan:
    """The plan with each chunk's draft slots replaced by the drafter's chain or tree (`ModelRunner.propose`), each
    branch cut where a grammar (structured outputs) stops accepting it; the pages reserved for the slots cut stay the
    sequence's."""
    chunks, cut = [], 0
    for chunk, draft in zip(plan.chunks, drafts):
        if chunk.draft:
            if chunk.seq.matcher is not None:
                draft = structured.valid_tree(chunk.seq.matcher, draft)
            cut += len(chunk.draft) - len(draft)
            real = chunk.token_ids[: len(chunk.token_ids) - len(chunk.draft)]
            chunk = dataclasses.replace(chunk, token_ids=real + list(draft.tokens), draft=draft.tokens,
                                        draft_parents=() if draft.is_chain else draft.parents)
        chunks.append(chunk)
    return dataclasses.replace(plan, chunks=chunks, num_decode_tokens=plan.num_decode_tokens - cut)

