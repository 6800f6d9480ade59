"""`LLMEngine`: one replica. `step()` is schedule -> launch -> complete the previous step, nothing else.

A request's life, text to text:
  1. `add_request` tokenizes (or takes token ids), validates, and queues a `Sequence`.
  2. `Scheduler.schedule` admits it: the radix cache supplies its longest cached prefix, pages are
     allocated for the unmatched tail only, which is prefilled in chunks inside a ragged batch that
     also carries every running decode.
  3. `ModelRunner.launch` packs the plan into bucketed arrays and dispatches the jitted step (KV
     donated) and the sampler; `Scheduler.advance` records it with placeholder tokens.
  4. While the device computes, the previous step completes: `ModelRunner.fetch` brings its sampled
     tokens back in one host sync, `Scheduler.resolve` puts them in place and applies stop tokens;
     `engine.output.OutputState` detokenizes them incrementally and checks stop strings, and a
     `RequestOutput` is returned (`OutputKind`: the totals so far, the step's delta, or the final one only). (`scheduler.overlap: false`: each step completes in
     the call that launched it.)
  5. On finish the sequence's full pages stay in the tree (the next chat turn hits), its lock and
     references go, and the partial last page returns to the pool.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import random
import time
from typing import Mapping, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import fp8_matmul, kv_quant
from engine import draft_model, mtp_drafter, multihost, multimodal, prompt_embeds, scoring, speculative, structured
from engine.compiled import release_executables_if_crowded, setup_compilation_cache
from engine.image_encoder import ImageEncoder
from engine.adapters import AdapterSlots
from engine.disk_cache import arrays_digest, replica_layout, weights_identity
from engine.kv_transfer import ReplicaTransfer, offered_tokens
from engine.kv_plan import ReplicaDisk, plan_kv_cache
from engine.block_hash import ADAPTER_NAMESPACE, cache_namespace, page_hashes
from engine.replica_weights import PreparedWeights, ReplicaWeights
from engine.config import W8A8, ConfigKeyError, EngineConfig
from engine.output import OutputKind, OutputState, RequestOutput, truncate_output
from engine.token_rules import TokenRules
from engine.request import RequestError, SamplingParams, Sequence, Status, truncate_prompt, validate_prompt
from engine.runner import FILTER_HEADS, ModelRunner
from engine.scheduler import Scheduler
from models import classifier, llama, quant, sharding
from models.weights import cast_params
from models.loader import checkpoint_quantization, load_weights, sampling_defaults, tokenizer_source
from models.chat_template import read_chat_template
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DISK_WAIT_S = 0.05  # an idle engine waits this long at most for prompt pages being read from disk, per step call


def _branches(chunk, rows: list[int]) -> list[tuple[list[int], list[int]]]:
    """(head rows, draft tokens) of each root-to-leaf path of a chunk's drafts (`rows`: its head rows, node order): a
    path's rows[j] samples after its first j drafts. A chain is one path."""
    if not chunk.draft_parents:
        return [(rows, list(chunk.draft))]
    tree = chunk.draft_tree
    paths = [tree.path(leaf) for leaf in tree.leaves()]
    return [([rows[0]] + [rows[n] for n in path], [chunk.draft[n - 1] for n in path]) for path in paths]


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def quant_kernel_mode(backend: str, layers: dict, device) -> str:
    """LlamaConfig.quant_kernels for these weights where attention runs `backend`: which quantized weights the Pallas
    kernels read as stored (pallas_kernels/fp8_matmul.py, per device under tensor parallelism), e4m3 on devices that
    convert it. On a GPU only the 8-bit experts ("pallas_experts"), the dense block-scaled projections left to XLA: on
    an H200 its dequantize-then-GEMM took 0.245 / 0.234 ms a layer at 1 / 64 tokens where the kernel took 0.397 /
    0.404, while the grouped kernel ran 64 tokens' int8 experts 2.4x faster than XLA (docs/kernels.md "GPU results").
    Interpreted, both (the tests')."""
    if not backend.startswith("pallas"):
        return "none"
    experts = [k for k in quant.EXPERTS if k + quant.SCALE_SUFFIX in layers and k + quant.OFFSET_SUFFIX not in layers]
    if backend == "pallas_interpret":
        blocks = [k.removesuffix(quant.BLOCK_SCALE_SUFFIX) for k in layers if k.endswith(quant.BLOCK_SCALE_SUFFIX)]
        return backend if blocks or experts else "none"
    if experts and (fp8_matmul.supported(device) or all(layers[k].dtype == jnp.int8 for k in experts)):
        return "pallas_experts"
    return "none"


class LLMEngine:
    """One replica. `model` = (LlamaConfig, params, Tokenizer) skips loading `config.model.path` (tests); `draft` =
    (LlamaConfig, params) is the draft model of `speculative.method: draft_model` in place of `speculative.model`;
    `vision` = (models.vision.VisionConfig, its params, engine.images.ImageProcessor) beside `model`: a model that takes
    images (a checkpoint's are read from model.path). With `speculative.method: mtp`, `draft` = (models.mtp.MtpConfig,
    params) is the MTP layer in place of the checkpoint's."""

    def __init__(self, config: EngineConfig, progress: bool = True, model: tuple | None = None,
                 draft: tuple | None = None, vision: tuple | None = None):
        t0 = time.perf_counter()
        if config.parallel.data > 1:
            raise ConfigKeyError(f"parallel.data={config.parallel.data}: one engine is one replica; the offline job "
                                 "(scripts/generate.py) and the server (scripts/serve.py) run one engine process "
                                 "per replica")
        if config.model.quantization == "auto":  # what the checkpoint stores (weights given as arrays: none)
            quantization = checkpoint_quantization(config.model.path) if model is None else "none"
            if quantization != "none":
                log.info("model.quantization: auto -> %s (the checkpoint's own format; none dequantizes it)",
                         quantization)
            config = config.replace(**{"model.quantization": quantization})
        self.config = config
        multihost.initialize(config.parallel)  # before anything touches a device
        setup_compilation_cache(config.compilation_cache_dir)
        release_executables_if_crowded()  # before this engine compiles its programs
        self.dtype = resolve_dtype(config.model.dtype)
        if model is None:
            model_cfg, params = load_weights(config.model.path, self.dtype, config.model.quantization)
            self.tokenizer = Tokenizer.load(tokenizer_source(config.model.path))
            if not config.model.mmproj:
                vision = vision or multimodal.load_image_model(config.model.path, self.dtype,
                                                               config.model.mm_processor_kwargs)
        else:
            model_cfg, params, self.tokenizer = model
            params = cast_params(params, self.dtype)
        # A sequence classifier's score head (a checkpoint's, or the LM head's rows for model.classifier_from_token):
        # applied on the host to the normed last row an embedding request fetches, so the compiled steps are the
        # language model's (models/classifier.py).
        self.score_head, self._head_tokens = self._score_head(config, model_cfg, params)
        params = {k: v for k, v in params.items() if k != "score"}
        if config.model.mmproj and vision is None:  # llama.cpp's image encoder file beside a GGUF text model
            vision = multimodal.load_mmproj(config.model.mmproj, self.dtype, self.tokenizer, model_cfg.hidden_size,
                                            config.model.mm_processor_kwargs)
        # What the checkpoint recommends for the sampling fields a request leaves out (model.generation_config)
        self.sampling_defaults = (sampling_defaults(config.model.path)
                                  if model is None and config.model.generation_config == "auto" else {})
        if self.sampling_defaults:
            log.info("sampling defaults from the checkpoint (requests that leave them out; model.generation_config: "
                     "none turns this off): %s", ", ".join(f"{k}={v}" for k, v in self.sampling_defaults.items()))
        if model_cfg.linear_layers:
            config = self._recurrent_model(config, model_cfg)
            self.config = config
        if config.model.chat_template:
            self.tokenizer = self.tokenizer.with_chat_template(read_chat_template(config.model.chat_template))
        try:  # how a cross-encoder reads a /v1/score or /v1/rerank pair
            self.pair_format = scoring.PairFormat(self.tokenizer, config.model.score_template and read_chat_template(
                config.model.score_template, "model.score_template"))
        except ValueError as e:
            raise ConfigKeyError(str(e)) from None
        if config.model.score_template and self.score_head is None:
            log.warning("model.score_template: the model is no cross-encoder (no score head of one label), so pairs "
                        "are scored by the cosine of embeddings and the template is not used")
        tp = config.parallel.tensor
        self.mesh = sharding.make_mesh(tp) if tp > 1 else None
        self._loaded_cfg = model_cfg  # before tensor-parallel preparation (LoRA adapters are read against it)
        self.model_cfg, _ = sharding.prepare_for_tensor_parallel(model_cfg, {"layers": {}}, tp,  # the config only
                                                                  config.parallel.expert)
        self.max_model_len = min(config.model.max_model_len, self.model_cfg.max_position)
        # The context served, not the checkpoint's: it picks LongRoPE's table (RopeScaling.longrope_factors).
        self.model_cfg = dataclasses.replace(self.model_cfg, max_position=self.max_model_len)
        if model_cfg.num_experts:
            grouped = config.model.moe_backend == "grouped" or (config.model.moe_backend == "auto"
                                                                and jax.default_backend() != "cpu")
            self.model_cfg = dataclasses.replace(self.model_cfg, moe_grouped=grouped)
        if config.model.smoothquant_alpha > 0 and config.model.quantization == "w8a8" and config.lora.adapters:
            log.warning("model.smoothquant_alpha: not applied with LoRA adapters (they read the unsmoothed inputs)")
        # The disk tier names the K/V of weights given as arrays by their bytes (of a checkpoint: by its files).
        transfer = config.parallel.kv_transfer == "jax"
        weights_id = arrays_digest(params) if model is not None and (config.cache.disk_path or transfer) else None
        self.weights = ReplicaWeights(config, self._loaded_cfg, self.model_cfg, self.dtype, self.mesh, self.tokenizer,
                                      params, progress)
        del params
        if config.model.quantization in W8A8:  # the decoder reads it: 8-bit activations into the 8-bit matmuls
            self.model_cfg = dataclasses.replace(self.model_cfg, quantized_activations=True)
        self.weights_version = 0  # update_weights counts up
        # What the weights served came from: model.path, or the last update's path (the router compares it with the
        # fleet's; "in-process" for arrays given directly).
        self.weights_source = config.model.path if model is None else "in-process"
        self.sleep_level = 0  # sleep(): 1 weights in host memory, 2 weights dropped; the KV cache freed at both
        # The cache arrays' storage dtype (pallas_kernels/kv_quant.py): the model's or cache.kv_dtype, bfloat16 and
        # float8 kept as their bits.
        kind = config.cache.kv_dtype
        self.kv_dtype = kv_quant.storage_dtype(self.dtype if kind == "auto" else kind)
        self.draft = None  # engine.draft_model.DraftModel (speculative.method: draft_model, mtp, eagle3)
        self.mtp = None  # models.mtp.MtpConfig (speculative.method: mtp) or models.eagle3.Eagle3Config (eagle3)
        if config.speculative.method in speculative.DRAFTERS and config.cache.hybrid and self.model_cfg.kv_reach:
            log.warning("cache.hybrid: off: speculative.method %s keeps its K/V in whole pages of every layer, which "
                        "a hybrid cache (this model's %s layers) does not have", config.speculative.method,
                        "chunked" if self.model_cfg.kv_reach[2] else "sliding-window")
            config = config.replace(**{"cache.hybrid": False})
            self.config = config
        if config.speculative.method in speculative.DRAFTERS:
            draft_model.check_supported(config, self.model_cfg)
        if config.speculative.method == "draft_model":
            self.draft = draft_model.load_draft(config, self.dtype, self.tokenizer, draft, self.mesh, progress)
        elif config.speculative.method in ("mtp", "eagle3"):
            mtp_drafter.check_supported(config, self._loaded_cfg)
            self.draft, self.mtp = mtp_drafter.load_drafter(config, self._loaded_cfg, self.model_cfg, self.dtype,
                                                            self.tokenizer, draft, self.mesh, progress)
        draft_cfg = self.draft.cfg if self.draft else None
        self.kv = plan_kv_cache(config, self.model_cfg, self.max_model_len, self.kv_dtype, draft_cfg,
                                draft_split=self.mtp is not None)
        # Snapshots of the recurrent states at page boundaries: the prefix cache of a model with linear attention layers
        self.num_snapshots = config.cache.state_snapshots if model_cfg.linear_layers and config.cache.prefix_caching else 0
        backend = pallas_kernels.resolve_backend(config.attention.backend, self.model_cfg.kv_dims)
        mode = quant_kernel_mode(backend, self.params["layers"], jax.devices()[0])
        if mode != "none":
            self.model_cfg = dataclasses.replace(self.model_cfg, quant_kernels=mode)
        if self.mtp is not None:  # the MTP layer's quantized matmuls as the model's (an EAGLE-3 head has none)
            layer = dataclasses.replace(self.mtp.layer, quant_kernels=quant_kernel_mode(
                backend, self.draft.weights.params["layers"], jax.devices()[0]))
            self.mtp, self.draft = dataclasses.replace(self.mtp, layer=layer), dataclasses.replace(self.draft, cfg=layer)
        self._disk = None  # the disk tier (engine.kv_plan.ReplicaDisk)
        if config.cache.disk_path and config.cache.prefix_caching:
            self._disk = ReplicaDisk(config, self.model_cfg, self.dtype, self.kv_dtype, backend, self.kv,
                                     weights_id or weights_identity(config.model.path), self._draft_identity(draft))
        self.scheduler = Scheduler(config.scheduler, config.cache, self.kv.num_pages, self.max_model_len,
                                   eos_ids=frozenset(self.tokenizer.stop_ids), spec=config.speculative,
                                   num_host_pages=self.kv.num_host_pages,
                                   window=reach[1] if (reach := self.model_cfg.kv_reach) else 0,
                                   chunked_window=bool(reach and reach[2]),
                                   num_window_pages=self.kv.num_window_pages, disk=self.disk,
                                   num_state_slots=config.scheduler.max_running if self.model_cfg.linear_layers else 0,
                                   num_snapshots=self.num_snapshots, num_host_states=self.kv.num_host_states,
                                   disk_states=self._disk.states if self._disk is not None else None)
        self.transfer = None  # engine.kv_transfer.ReplicaTransfer (parallel.kv_transfer: jax), set below
        if config.parallel.num_processes > 1 and (config.lora.adapters or config.lora.max_adapters):
            raise ValueError("lora.adapters: LoRA adapters are not supported with parallel.num_processes > 1")
        self.adapters = AdapterSlots(config.lora, self._loaded_cfg, self.model_cfg, self.dtype, tp, self.mesh)
        # A model that takes images (models/vision.py): its prompts' images (engine.multimodal), its vision tower
        self.image_prompts, encoder = None, None
        self._input_rows = None  # `token_embeddings`' program, compiled at its first call
        if vision is None and config.model.mm_processor_kwargs:
            raise ConfigKeyError("model.mm_processor_kwargs: this model takes no images (its checkpoint has no vision "
                                 "tower)")
        if config.model.enable_prompt_embeds and config.parallel.num_processes > 1:
            raise ConfigKeyError("model.enable_prompt_embeds: a replica over several processes takes no prompt "
                                 "embeddings (its steps' rows are not broadcast to the other hosts)")
        if vision is not None:
            vcfg, vision_params, processor = vision
            if config.parallel.num_processes > 1:
                raise ConfigKeyError("parallel.num_processes: a model that takes images runs in one process (its "
                                     "steps' image rows are not broadcast to the other hosts)")
            both_ways = multimodal.attends_both_ways(vcfg)  # Gemma 3
            self.image_prompts = multimodal.ImagePrompts(
                vcfg, processor, self.model_cfg.vocab_size,
                newlines=multimodal.newline_tokens(self.tokenizer) if both_ways else None)
            if both_ways:
                if self.model_cfg.index_topk:
                    raise ConfigKeyError("images attending to each other both ways (Gemma 3's) in a model with sparse "
                                         "attention's indexer are not supported (its top-k is causal)")
                multimodal.check_whole_images(config.scheduler, vcfg.tokens_per_image)
            encoder = ImageEncoder(vcfg, cast_params(vision_params, self.dtype), self.dtype,
                                              lambda tree: jax.device_put(tree, None if self.mesh is None else
                                                                          sharding.replicated(self.mesh)))
            log.info("images: %s", self.image_prompts.summary)
        self.runner = ModelRunner(self.model_cfg, self.params, config, self.kv.num_pages, self.max_model_len,
                                  self.kv_dtype, backend, mesh=self.mesh, eos_ids=frozenset(self.tokenizer.stop_ids),
                                  num_host_pages=self.kv.num_host_pages, lora=self.adapters.stacked(),
                                  num_window_pages=self.kv.num_window_pages, disk=self.disk,
                                  draft=(draft_cfg, self.draft.weights.params) if self.draft else None,
                                  num_snapshots=self.num_snapshots, num_host_states=self.kv.num_host_states,
                                  disk_states=self._disk.states if self._disk is not None else None,
                                  images=encoder, mtp=self.mtp,
                                  prompt_rows=self.dtype if config.model.enable_prompt_embeds else None)
        if config.parallel.num_processes > 1 and multihost.is_leader():
            self.runner.followers = multihost.Followers()
        if transfer:  # prompt pages to and from other replicas over the network (disaggregation)
            layout = functools.partial(replica_layout, config, self.model_cfg, self.dtype, self.kv_dtype, backend,
                                       bool(self.kv.num_window_pages), draft=self._draft_identity(draft))
            self.transfer = ReplicaTransfer(config, self.model_cfg, self.kv, layout,
                                            weights_id or weights_identity(config.model.path), self.scheduler,
                                            self.runner)
        if config.warmup:
            self.runner.warmup(progress and multihost.is_leader())
        self.grammars = structured.Grammars(self.tokenizer, self.model_cfg.vocab_size)
        self._ids = itertools.count()
        self._seed_rng = random.Random()
        self._state: dict[str, OutputState] = {}
        self.num_steps = 0
        self.num_generated_tokens = 0  # tokens sampled for requests, unfinished ones included (a job's live rate)
        self.last_step: dict = {}
        self._inflight = None  # (StepPlan, runner.LaunchedStep): launched, tokens not yet back
        self._wait_s = 0.0
        self.startup_s = time.perf_counter() - t0

    def _score_head(self, config: EngineConfig, model_cfg, params: dict):
        """-> (the score head or None, the vocabulary ids its rows come from or None). ConfigKeyError naming what
        cannot be a classifier."""
        tokens = config.model.classifier_from_token
        if not tokens:
            return (classifier.ScoreHead.from_checkpoint(params, model_cfg) if "score" in params else None), None
        if "score" in params:
            raise ConfigKeyError(f"model.classifier_from_token: {config.model.path} is a sequence classifier already "
                                 f"({model_cfg.num_labels} labels); it needs no LM head rows")
        try:
            ids = classifier.token_ids(self.tokenizer, tokens)
            head = classifier.from_tokens(params, model_cfg, tokens, ids, config.model.classifier_method)
        except ValueError as e:
            raise ConfigKeyError(str(e)) from None
        log.info("served as a classifier: the LM head's rows for %s (ids %s), %s", list(tokens), list(ids),
                 "one label, their logits' difference" if head.two_way else f"{head.num_labels} labels")
        return head, ids

    @staticmethod
    def _recurrent_model(config: EngineConfig, model_cfg) -> EngineConfig:
        """The config for a model with linear attention layers (a recurrent state per sequence): slots for the prefix
        cache's snapshots of it (engine.state_snapshots) sized."""
        if config.cache.prefix_caching and not config.cache.state_snapshots:
            config = config.replace(**{"cache.state_snapshots": 2 * config.scheduler.max_running})
        return config

    def _draft_identity(self, given: tuple | None) -> dict | None:
        """What names the draft model's K/V for the disk tier (its config, weights and quantization); None without."""
        if self.draft is None:
            return None
        spec = self.config.speculative
        if spec.method == "mtp":  # the checkpoint's own layer
            weights = arrays_digest(given[1]) if given is not None else weights_identity(self.config.model.path)
            return {"config": self.draft.cfg, "weights": weights,
                    "quantization": "mtp " + mtp_drafter.QUANTIZATIONS.get(self.config.model.quantization, "none")}
        weights = arrays_digest(given[1]) if given is not None else weights_identity(spec.model)
        if spec.method == "eagle3":  # (the layers it reads are part of what its K/V is)
            return {"config": self.draft.cfg, "weights": weights, "quantization": "eagle3 none",
                    "aux_layers": list(self.mtp.aux_layers)}
        return {"config": self.draft.cfg, "weights": weights, "quantization": spec.quantization}

    @property
    def disk(self):
        """The disk tier's files (engine.disk_cache.DiskCache), or None."""
        return self._disk.cache if self._disk is not None else None

    @property
    def params(self) -> dict | None:
        """The weights on the devices (None while asleep)."""
        return self.weights.params

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters loaded now, by name."""
        return self.adapters.loaded

    def load_adapter(self, name: str, path: str) -> None:
        """Serves a PEFT LoRA adapter by `name` from now on, in a free slot (lora.max_adapters), without recompiling:
        the stacked weights keep their shapes. Its requests' cache namespace is its name: pages cached for an earlier
        adapter of that name are used again if its files are the same, and the whole cache is emptied if they
        differ. ValueError names what is wrong (no slot, rank over lora.max_rank, a bad adapter, the name taken)."""
        self.install_adapter(name, *self.adapters.read(path))

    def install_adapter(self, name: str, weights: dict, digest: str) -> None:
        """load_adapter with the files already read (`self.adapters.read`, off the engine thread)."""
        if self.adapters.install(name, weights, digest):  # its old pages hold K/V of other weights
            self.scheduler.reset_cache()
            log.warning("LoRA adapter %r reloaded with other weights: prefix cache emptied", name)
        self.runner.lora = self.adapters.stacked()

    def unload_adapter(self, name: str) -> None:
        """Frees `name`'s slot. ValueError if no adapter has that name, or requests of it are unfinished."""
        self.adapters.check_loaded(name)
        users = sum(1 for seq in (*self.scheduler.running, *self.scheduler.waiting)
                    if seq.adapter == self.adapters.id_of(name))
        if users:
            raise ValueError(f"LoRA adapter {name!r} has {users} unfinished requests; unload it when they are done")
        self.adapters.remove(name)
        self.runner.lora = self.adapters.stacked()

    # ------------------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | Seq[int] | Mapping,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        namespace: str | None = None,
        priority: int = 0,
        adapter: str | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        images: Seq | None = None,
    ) -> str:
        """Queues a request (text, token ids, or vLLM's prompt dicts: {"prompt": text} or {"prompt_token_ids": ids},
        each with optional {"multi_modal_data": {"image": ...}}, or {"prompt_embeds": [tokens, hidden] array} with
        model.enable_prompt_embeds); raises RequestError naming what is wrong. `priority` (lower runs
        first) needs scheduler.policy "priority"; `adapter` names one of lora.adapters (None: the base model).
        `output_kind` (engine.output.OutputKind): one output per step with everything so far (CUMULATIVE), with what
        the step added (DELTA: what a stream sends, at a cost that does not grow with the output), or the final
        output only (FINAL: no per-step text at all). `images` (a model that takes images): one per placeholder token
        of the prompt, each a source `engine.images.load_image` reads (a URL, a path, bytes, a PIL image, an array),
        or the prompt's `engine.multimodal.ImageSpan`s where the prompt came from `ImagePrompts.prepare`."""
        params = params or SamplingParams()
        if self.sleep_level:
            raise EngineAsleep(f"the engine is asleep (level {self.sleep_level}); wake_up first")
        if adapter is not None and adapter not in self.adapter_names:
            raise RequestError(f"no LoRA adapter named {adapter!r} (loaded: {', '.join(self.adapter_names) or 'none'})")
        if not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
            raise RequestError(f"priority must be a 32-bit integer, got {priority!r}")
        if priority and self.config.scheduler.policy != "priority":
            raise RequestError(f"priority {priority} needs scheduler.policy=priority (it is {self.config.scheduler.policy})")
        if self.score_head is not None and not params.embed:
            raise RequestError(f"this model is a sequence classifier ({self.score_head.num_labels} labels): it scores "
                               "prompts (LLM.classify, POST /classify) and embeds them; it generates nothing")
        spans = []
        if isinstance(prompt, Mapping):  # vLLM's prompt dicts
            prompt, images = _unpacked_prompt(prompt, images)
        if isinstance(prompt, Mapping):
            if images:
                raise RequestError("a prompt given as embeddings takes no images")
            prompt_ids, spans = self.embeds_prompt(prompt, params)
        elif isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        if images:
            prompt_ids, spans = self._with_images(prompt_ids, images, params)
        prompt_ids = truncate_prompt(prompt_ids, params.truncate_prompt_tokens, self.max_model_len, params.max_tokens)
        validate_prompt(prompt_ids, self.model_cfg.vocab_size, self.max_model_len, params.max_tokens, bool(spans))
        bad = [t for t, _ in params.logit_bias if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise RequestError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {self.model_cfg.vocab_size})")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._state:
            raise RequestError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(32)
        if namespace is not None and namespace.startswith(ADAPTER_NAMESPACE):
            raise RequestError(f"cache namespace (cache_salt) must not start with {ADAPTER_NAMESPACE!r}")
        namespace = cache_namespace(namespace, adapter)
        seq = Sequence(request_id=request_id, prompt_ids=prompt_ids, params=params, namespace=namespace, seed=seed,
                       priority=priority, adapter=self.adapters.id_of(adapter), images=spans)
        if params.structured is not None:
            seq.matcher = self.grammars.matcher(params.structured)
        seq.token_rules = TokenRules.of(params, lambda text: self.tokenizer.encode(text, add_special_tokens=False),
                                        self.model_cfg.vocab_size)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)  # the first token has nothing before it
            seq.prompt_top_logprobs.append([])
            seq.prompt_ranks.append(None)
        if spans and spans[0].given:  # (no text before the output)
            text_ids = []
        elif spans:
            text_ids = multimodal.text_ids(prompt_ids, self.model_cfg.vocab_size,
                                           self.image_prompts.vcfg.image_token_id)
        else:
            text_ids = prompt_ids
        self._state[request_id] = OutputState(seq, self.tokenizer.detokenizer(text_ids, params.skip_special_tokens),
                                                output_kind)
        self.scheduler.add(seq)
        return request_id

    def encode_chat(self, messages: list[dict], **kwargs) -> tuple[list[int], list]:
        """A chat's prompt ids through the chat template (`Tokenizer.encode_chat`'s arguments), and the sources of the
        images its messages hold, in order (engine.multimodal.split_images; add_request's `images`)."""
        return multimodal.encode_chat(self.tokenizer, self.image_prompts, messages, **kwargs)

    def embeds_prompt(self, prompt: Mapping, params: SamplingParams) -> tuple[list[int], list]:
        """(prompt ids, [its span]) of a prompt given as embeddings, {"prompt_embeds": [tokens, hidden] array}, its
        rows kept as truncate_prompt_tokens says (engine/prompt_embeds.py). The server prepares one here and passes
        both to `add_request` (as the ids and `images`)."""
        self._check_embeds_request(params)
        rows = prompt_embeds.rows_of(prompt["prompt_embeds"], self.model_cfg.hidden_size, self.dtype)
        rows = truncate_prompt(rows, params.truncate_prompt_tokens, self.max_model_len, params.max_tokens)
        ids, span = prompt_embeds.span_of(rows, self.model_cfg.vocab_size)
        return ids, [span]

    def _check_embeds_request(self, params: SamplingParams) -> None:
        """Refuses a prompt given as embeddings where the engine takes none, or with prompt logprobs (no tokens)."""
        if not self.config.model.enable_prompt_embeds:
            raise RequestError("prompt_embeds: this engine takes no prompt embeddings (set "
                               "model.enable_prompt_embeds: true)")
        if params.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs is not available for a prompt given as embeddings (it has no tokens)")

    def token_embeddings(self, prompt: str | Seq[int]) -> np.ndarray:
        """[tokens, hidden] in the model's dtype: what the model's first layer reads for a prompt's tokens
        (models.llama.input_rows), where a prompt given as embeddings starts from (a soft prompt before them, an edited
        row). Compiled once per power-of-two length."""
        if self.sleep_level:
            raise EngineAsleep(f"the engine is asleep (level {self.sleep_level}); wake_up first")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        validate_prompt(ids, self.model_cfg.vocab_size, self.max_model_len, 0)
        padded = np.zeros(1 << (len(ids) - 1).bit_length(), np.int32)
        padded[: len(ids)] = ids
        if self._input_rows is None:
            self._input_rows = jax.jit(functools.partial(llama.input_rows, cfg=self.model_cfg))
        return np.asarray(self._input_rows(self.runner.params, tokens=padded))[: len(ids)]

    def _with_images(self, prompt_ids: list[int], images: Seq, params: SamplingParams):
        """(prompt ids with its images' positions, their spans): images given as sources are prepared here; the
        span of a prompt given as embeddings (`embeds_prompt`) passes as it is."""
        if len(images) == 1 and isinstance(images[0], multimodal.ImageSpan) and images[0].given:
            span = images[0]
            self._check_embeds_request(params)
            if span.start != 0 or len(prompt_ids) != span.num_tokens or min(prompt_ids) < self.model_cfg.vocab_size:
                raise RequestError("prompt_embeds: the prompt ids are not its rows' (LLMEngine.embeds_prompt's)")
            return prompt_ids, [span]
        if self.image_prompts is None:
            raise RequestError("this model takes no images (its checkpoint has no vision tower)")
        if params.truncate_prompt_tokens is not None:
            raise RequestError("truncate_prompt_tokens does not apply to a prompt with images")
        if params.prompt_logprobs is not None:
            raise RequestError("prompt_logprobs is not available for a prompt with images")
        if all(isinstance(x, multimodal.ImageSpan) for x in images):
            self.image_prompts.check(prompt_ids, images)
            return prompt_ids, list(images)
        return self.image_prompts.prepare(prompt_ids, images)

    def abort(self, request_id: str) -> bool:
        """Ends a request now (client gone); its pages return to the pool. False if unknown."""
        state = self._state.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.abort(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Plans and launches one step; returns the outputs of the step that completed during this call.

        With `scheduler.overlap` the step launched here is still running when this returns: its outputs
        come with the next call, and the host work in between (this plan, the previous step's stop checks
        and detokenizing) overlaps the device's work. Without it, each call completes its own step.
        """
        t0 = time.perf_counter()
        self._wait_s = 0.0
        outputs = []
        if self.config.speculative.draft_tokens:
            outputs += self._complete()  # drafts are read from the sequences' known tokens
        plan = self.scheduler.schedule()
        if plan is not None and self.config.debug_checks:
            self.scheduler.check_writes(plan)
        if plan is not None and self.draft is not None:  # the draft model fills the draft slots the plan reserved
            plan = draft_model.fill_drafts(plan, self.runner.propose(plan))
        if plan is not None and self._inflight is not None and self._needs_known_tokens(plan):
            outputs += self._complete()  # penalties count, and grammars consume, the generated tokens on the host
        launched = None
        if plan is not None:
            targets = self._prompt_targets(plan)
            launched = self.runner.launch(plan, self._token_mask(plan), [(r, t) for r, t, _, _ in targets],
                                          max((seq.params.prompt_logprobs for _, _, seq, _ in targets), default=0),
                                          copied=self.draft is not None)
        outputs += self._complete()
        if launched is not None:
            self.scheduler.advance(plan)
            self._inflight = (plan, launched, targets)
            if not self.config.scheduler.overlap:
                outputs += self._complete()
            self.num_steps += 1
            # pack_s: host time packing and dispatching the launched step; wait_s: time blocked on results.
            self.last_step = {"total_s": time.perf_counter() - t0, "num_decode": plan.num_decode_tokens,
                              "num_prefill": plan.num_prefill_tokens, "pack_s": launched.pack_s, "wait_s": self._wait_s}
        if self.disk is not None and self._inflight is None:  # the device is idle
            self._disk_idle(wait=launched is None)
        if self.config.debug_checks:
            self.scheduler.check_invariants()
        return outputs

    def warmup_sampling_filters(self, progress: bool = True) -> None:
        """With `warmup`, the head's top-k/top-p/min-p variant compiled now at every sequence bucket too: a server's
        requests may ask for them, and a compile in a step holds up every stream in the batch. (Not in a multi-host
        replica: its processes run each computation together, and theirs follow steps only.)"""
        if self.config.warmup and self.runner.params is not None and self.config.parallel.num_processes == 1:
            t0 = time.perf_counter()
            self.runner.warmup_heads(FILTER_HEADS, progress)
            log.info("top-k/top-p sampling compiled in %.1f s", time.perf_counter() - t0)

    def _disk_idle(self, wait: bool) -> None:
        """No step is in flight: pages the tree stored since the last one are written out now, and, when no step could
        run (`wait`), requests whose prompt pages are being read from disk are waited for (briefly: the caller's loop
        comes back)."""
        self._save_to_disk()
        if wait and (reads := self.scheduler.disk_reads()):
            concurrent.futures.wait(reads, timeout=DISK_WAIT_S, return_when=concurrent.futures.FIRST_COMPLETED)

    def _save_to_disk(self) -> None:
        """Writes out the pages the tree stored since the last step, with no step to carry them; the moves of accepted
        draft-tree nodes that step would have made come first (a stored page may hold them)."""
        self.runner.move_slots(self.scheduler.take_slot_moves())
        self.runner.save_to_disk(self.scheduler.take_disk_saves(), self.scheduler.take_disk_states())

    @staticmethod
    def _needs_known_tokens(plan) -> bool:
        return any(c.sample and (c.seq.params.uses_penalties or c.seq.matcher is not None
                                 or (c.seq.token_rules is not None and c.seq.token_rules.needs_history))
                   for c in plan.chunks)

    def _token_mask(self, plan) -> np.ndarray | None:
        """The tokens each head row may sample, when some row follows a structured-output grammar (a chunk with draft
        tokens: each position's mask, the grammar advanced through the drafts before it) or token rules
        (allowed_token_ids, bad_words: engine.token_rules)."""
        if not any(c.sample and (c.seq.matcher is not None or c.seq.token_rules is not None) for c in plan.chunks):
            return None
        head_rows = self.runner.head_rows(plan)
        constrained = [(c, rows) for c, rows in zip(plan.chunks, head_rows) if c.sample and c.seq.matcher is not None]
        plain = [(c.seq.matcher, rows[-1]) for c, rows in constrained if not c.draft]
        # A draft tree's rows go branch by branch: each node's mask follows its own path (the shared nodes' come out
        # alike); a branch past the first takes a copy of the matcher, as llguidance fills them all at once.
        drafts = [(c.seq.matcher if i == 0 else c.seq.matcher.deep_copy(), branch_rows, draft)
                  for c, rows in constrained if c.draft for i, (branch_rows, draft) in enumerate(_branches(c, rows))]
        num_rows = sum(map(len, head_rows))
        mask = (self.grammars.masks(plain, num_rows, drafts) if constrained
                else np.full((num_rows, structured.mask_words(self.model_cfg.vocab_size)), -1, np.int32))
        for c, rows in zip(plan.chunks, head_rows):
            if c.sample and c.seq.token_rules is not None:
                for branch_rows, draft in _branches(c, rows):
                    c.seq.token_rules.apply(mask, branch_rows, c.seq.output_ids, draft)
        return mask

    @staticmethod
    def _prompt_targets(plan) -> list[tuple[int, int, Sequence, int]]:
        """(row, token, sequence, position) for each prompt position whose logprob this step computes: row r's
        logits give the logprob of the prompt token after it. Positions already known (a recomputation after
        preemption) are not asked for again."""
        targets, row = [], 0
        for c in plan.chunks:
            seq = c.seq
            if seq.params.prompt_logprobs is not None:
                last = len(seq.prompt_ids) - 1
                for pos in range(max(c.start, len(seq.prompt_logprobs) - 1), min(c.start + len(c.token_ids), last)):
                    targets.append((row + pos - c.start, seq.prompt_ids[pos + 1], seq, pos + 1))
            row += len(c.token_ids)
        return targets

    def _complete(self) -> list[RequestOutput]:
        """Waits for the step in flight, puts its tokens in place, applies stops and streams the outputs."""
        if self._inflight is None:
            return []
        plan, launched, targets = self._inflight
        self._inflight = None
        t0 = time.perf_counter()
        out = self.runner.fetch(launched)
        now = time.perf_counter()
        self._wait_s += now - t0
        for row, _, seq, pos in targets:
            if pos == len(seq.prompt_logprobs):  # in order, each position once
                seq.prompt_logprobs.append(float(out.prompt_logprobs[row]))
                seq.prompt_ranks.append(int(out.prompt_ranks[row]))
                k = seq.params.prompt_logprobs
                seq.prompt_top_logprobs.append(
                    [(int(t), float(lp)) for t, lp in zip(out.prompt_top_ids[row][:k], out.prompt_top_logprobs[row][:k])])
        rows = launched.head_rows
        tokens = out.tokens.tolist()  # Python ints once, not a numpy scalar per sequence
        sampled = [None if not c.sample else tokens[r[0]] if len(r) == 1 else [tokens[j] for j in r]
                   for c, r in zip(plan.chunks, rows)]
        num_before = [len(c.seq.output_ids) - 1 for c in plan.chunks]  # output length before this step's tokens
        got_token = self.scheduler.resolve(plan, sampled)
        if self.scheduler.state_rollbacks:  # before any step reads those states (drafts are planned after this)
            self.runner.rollback_states(self.scheduler.state_rollbacks)
            self.scheduler.state_rollbacks = []
        index = {c.seq.request_id: i for i, c in enumerate(plan.chunks)}
        outputs = []
        for seq in got_token:
            state = self._state.get(seq.request_id)
            if state is None:
                continue
            i = index[seq.request_id]
            if seq.params.embed and seq.embedding is None:  # its prompt's last token is row rows[i][-1]
                vector = out.hidden[rows[i][-1]]
                seq.embedding = vector / max(float(np.linalg.norm(vector)), 1e-12)
                if self.score_head is not None:  # a sequence classifier: its score head over the same row
                    seq.classification = self.score_head(vector)
            if seq.matcher is not None:
                new = seq.output_ids[num_before[i] :]
                for j, token in enumerate(new):
                    if structured.advance(seq.matcher, token):  # the grammar is complete: the output ends here
                        if j + 1 < len(new):
                            truncate_output(seq, num_before[i] + j + 1)
                        if seq.status is not Status.FINISHED:
                            self.scheduler.finish(seq, "stop")
                        break
            num_new = len(seq.output_ids) - num_before[i]  # more than one when draft tokens were accepted
            emitted = rows[i]  # the rows that sampled the new tokens: a chain's in order, a tree's along its path
            if plan.chunks[i].draft_parents and (seq.params.logprobs is not None or seq.params.return_hidden_states):
                emitted = [rows[i][n] for n in [0, *speculative.accepted_path(plan.chunks[i].draft_tree, sampled[i])]]
            if seq.params.return_hidden_states:
                seq.output_hidden.extend(out.hidden[emitted[:num_new]])
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                for r in emitted[:num_new]:
                    seq.output_logprobs.append(float(out.logprobs[r]))
                    seq.output_top_logprobs.append(
                        [(int(t), float(lp)) for t, lp in zip(out.top_ids[r][:k], out.top_logprobs[r][:k])])
            if seq.first_token_s is None:
                seq.first_token_s = now
            seq.token_times_s.extend([now] * num_new)
            self.num_generated_tokens += num_new
            output = state.update(now, self.scheduler.finish)
            if output is not None:
                outputs.append(output)
                if output.finished:
                    self._state.pop(output.request_id, None)
        return outputs

    def reset_prefix_cache(self) -> int:
        """Drops every cached page no running request uses, host tier included, the images' kept features and suffix
        decoding's finished answers (benchmarks start each repetition cold)."""
        before = self.scheduler.tree.num_cached_pages
        self.scheduler.reset_cache()
        if self.scheduler.suffix is not None:
            self.scheduler.suffix.reset()
        if self.runner.images is not None:
            self.runner.images.clear()
        return before - self.scheduler.tree.num_cached_pages

    # ------------------------------------------------------------------------------ weight updates
    def load_weights_for_update(self, source, progress: bool = False) -> PreparedWeights:
        """New weights for `update_weights`, read and laid out while the engine keeps serving (`ReplicaWeights.read`:
        a checkpoint path, a pytree in `load_weights`' layout, or an HF-named state dict)."""
        return self.weights.read(source, progress)

    def update_weights(self, source, progress: bool = False) -> float:
        """Serves new weights from now on, without recompiling (same shapes and dtypes, same step functions); the
        prefix cache is emptied, since its K/V came from the old weights. `source`: as `load_weights_for_update` takes,
        or what it returned. Only between requests: with requests unfinished, a ValueError says so (the server waits
        for them first). Asleep, the weights wait in host memory for `wake_up`. LoRA adapters stay as they are.
        -> seconds taken."""
        t0 = time.perf_counter()
        if self.has_unfinished():
            raise ValueError(f"update_weights: {len(self.scheduler.running) + len(self.scheduler.waiting)} requests are "
                             "unfinished; update between batches, or abort them first")
        new = source if isinstance(source, PreparedWeights) else self.weights.read(source, progress)
        head = None
        if self.score_head is not None:  # a sequence classifier's head, kept on the host
            head = self.score_head.with_weights(new.params, self.model_cfg, self._head_tokens)
            new = dataclasses.replace(new, params={k: v for k, v in new.params.items() if k != "score"})
        elif "score" in new.params:
            raise ValueError(f"update_weights: a score head of shape {tuple(new.params['score'].shape)} for a language "
                             "model")
        self.weights.check(new)
        self.runner.params = None  # the old weights leave the device before the new arrive
        self.weights.swap(new)
        self.runner.params = self.weights.params
        if head is not None:
            self.score_head = head
        self.sleep_level = min(self.sleep_level, 1)  # asleep without weights no more
        self.scheduler.reset_cache()
        self.weights_version += 1
        self.weights_source = new.source
        if self._disk is not None:
            self._disk.serve_weights(new.source)
        if self.transfer is not None:
            self.transfer.serve_weights(new.source)
        seconds = time.perf_counter() - t0
        log.info("weights updated (version %d) in %.1f s; prefix cache emptied", self.weights_version, seconds)
        return seconds

    # ------------------------------------------------------------------------------------ sleep
    def sleep(self, level: int = 1) -> None:
        """Frees the accelerator memory this replica holds, for another job on the same devices (an RL trainer between
        rollouts): the KV cache (and recurrent states) freed and the prefix cache emptied; level 1 keeps the weights in host memory, level
        2 drops them (update_weights gives new ones). Requests are refused until `wake_up`. Only between requests."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (weights kept in host memory) or 2 (weights dropped), got {level!r}")
        if self.sleep_level:
            raise ValueError(f"already asleep (level {self.sleep_level})")
        if self.has_unfinished():
            raise ValueError(f"sleep: {len(self.scheduler.running) + len(self.scheduler.waiting)} requests are "
                             "unfinished; sleep between batches, or abort them first")
        t0 = time.perf_counter()
        self.scheduler.reset_cache()
        self.runner.params = self.runner.draft_params = None
        self.weights.offload(keep=level == 1)
        if self.draft is not None:  # kept whatever the level: weight updates give the model's weights only
            self.draft.weights.offload(keep=True)
        if self.runner.images is not None:  # the vision tower's too (weight updates give the language model's)
            self.runner.images.offload()
            self.runner.images.clear()
        for array in (*self.runner.kv, *jax.tree.leaves(self.runner.states)):
            array.delete()  # now, not when the last reference goes
        self.runner.kv = self.runner.states = None
        self.sleep_level = level
        log.info("asleep (level %d) in %.1f s: KV cache%s freed", level, time.perf_counter() - t0,
                 " and weights (kept in host memory)" if level == 1 else " and weights")

    def wake_up(self) -> None:
        """Allocates the KV cache again and puts the weights back on the devices (level 1, or after update_weights);
        the replica then serves as before it slept."""
        if not self.sleep_level:
            return
        t0 = time.perf_counter()
        self.weights.restore()
        self.runner.params = self.weights.params
        if self.draft is not None:
            self.draft.weights.restore()
            self.runner.draft_params = self.draft.weights.params
        if self.runner.images is not None:
            self.runner.images.restore()
        self.runner.kv = self.runner._allocate_kv()
        if self.model_cfg.linear_layers:
            self.runner.states = self.runner._allocate_states()
        self.sleep_level = 0
        log.info("awake in %.1f s", time.perf_counter() - t0)

    @property
    def is_leader(self) -> bool:
        """Process 0 of a (multi-host) replica: the one that schedules and serves."""
        return multihost.is_leader()

    def follow(self) -> None:
        """Other processes of a multi-host replica: run the leader's steps until it shuts down."""
        multihost.follow(self.runner)

    def shutdown(self) -> None:
        """Writes out what the disk tier still lacks, and releases the followers of a multi-host replica."""
        if self.disk is not None:
            self._save_to_disk()
            self.disk.flush()
            if self._disk.states is not None:
                self._disk.states.flush()
        if self.runner.followers is not None:
            self.runner.followers.stop()
            self.runner.followers = None

    @property
    def resumes_at_snapshots(self) -> bool:
        """A model with linear attention layers under prefix caching: a prefix is resumable only where a snapshot of
        its recurrent states is (the router's feed says so: `CacheEventFeed.recurrent`)."""
        return self.scheduler.pages.snapshots is not None

    def drain_cache_events(self):
        """Pages stored in / removed from the radix cache, and from its host tier, and (a model with linear attention
        layers) the prefixes with a snapshot of their recurrent states, since the last call (for the router feed). The engine keeps events only from the first call on, which reports what the cache holds then:
        an offline engine, which nobody drains, would otherwise keep every event it ever made."""
        events = self.scheduler.tree.drain_events()
        if self.scheduler.host is not None:
            events += self.scheduler.host.drain_events()
        return events + self.scheduler.pages.drain_snapshot_events()

    # ----------------------------------------------------------------- handing prompts to decode replicas
    def prompt_page_hashes(self, request_id: str) -> list[int]:
        """The block hashes of a live request's whole prompt pages, as the prefix cache and its tiers name them (its
        namespace, its images' ids): what a decode replica sharing the disk tier looks up."""
        seq, ps = self._state[request_id].seq, self.config.cache.page_size
        return page_hashes(seq.prompt_ids[: len(seq.prompt_ids) // ps * ps], ps, seq.namespace)

    def prompt_pages_key(self, request_id: str) -> tuple[tuple[int, ...], str | None]:
        """The tokens of a live request's whole prompt pages before the page of its last token (a step computes that
        one in any case), and its namespace: what the prefix cache finds them by (a prefill replica offers those
        pages to a decode replica, engine.kv_transfer)."""
        seq = self._state[request_id].seq
        return offered_tokens(seq.prompt_ids, self.config.cache.page_size), seq.namespace

    def receive_prompt_pages(self, request_id: str, last_hash: str, payloads: list, window_from: int = 0) -> int:
        """Pages a prefill replica computed for a queued request's prompt (engine.kv_transfer), for its admission ->
        how many were taken (none where they are not its prompt's: another namespace, other tokens)."""
        return self.transfer.receive(self._state[request_id].seq, last_hash, payloads, window_from)

    def disk_saving(self, hashes: Seq[int]) -> bool:
        """Whether a page or snapshot of recurrent states named in `hashes` is still on its way to the disk tier: queued
        for a plan, being copied off the device, or being written."""
        if self.disk is None:
            return False
        named, states = set(hashes), self._disk.states
        return (self.scheduler.tiers.saving(named) or self.runner.copies.saving_to_disk(named)
                or self.disk.writing(named) or (states is not None and states.writing(named)))

    # -------------------------------------------------------------------------------- stats
    @property
    def num_waiting(self) -> int:
        """Requests waiting for a place in the batch (preempted ones included)."""
        return len(self.scheduler.waiting)

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "num_waiting": len(s.waiting),
            "waiting_tokens": sum(q.num_tokens - q.num_computed for q in s.waiting),
            "num_running": len(s.running),
            "pages_total": s.pool.num_pages,
            "pages_free": s.pool.num_free,
            "pages_tree": s.tree.num_cached_pages,
            "pages_held_by_requests": sum(len(q.pages) for q in s.running),
            "num_preemptions": s.stats.num_preemptions,
            "num_evicted_pages": s.stats.num_evicted_pages,
            "prompt_tokens": s.stats.prompt_tokens,
            "cached_prompt_tokens": s.stats.cached_prompt_tokens,
            "host_pages_total": s.host.num_slots if s.host is not None else 0,
            "host_pages_used": len(s.host) if s.host is not None else 0,
            "host_hit_tokens": s.stats.host_hit_tokens,
            "host_saved_pages": s.stats.host_saved_pages,
            "disk_pages": len(self.disk) if self.disk is not None else 0,
            "disk_hit_tokens": s.stats.disk_hit_tokens,
            "disk_saved_pages": s.stats.disk_saved_pages,
            "disk_read_timeouts": s.stats.disk_read_timeouts,
            # prefill/decode disaggregation over the network (parallel.kv_transfer: jax)
            "transfer_hit_tokens": s.stats.transfer_hit_tokens,
            "transfer_offered_pages": self.transfer.stats["offered_pages"] if self.transfer is not None else 0,
            "transfer_received_pages": self.transfer.stats["received_pages"] if self.transfer is not None else 0,
            "transfer_dropped_pages": s.stats.received_dropped_pages,
            "transfer_pulls_failed": self.transfer.stats["pulls_failed"] if self.transfer is not None else 0,
            "spec_draft_tokens": s.stats.spec_draft_tokens,
            "spec_accepted_tokens": s.stats.spec_accepted_tokens,
            "spec_branch_tokens": s.stats.spec_branch_tokens,
            "suffix_cache_tokens": s.suffix.num_tokens if s.suffix is not None else 0,
            "window_pages_total": s.window.pool.num_pages if s.window is not None else 0,
            "window_pages_free": s.window.pool.num_free if s.window is not None else 0,
            "window_evicted_pages": s.stats.window_evicted_pages,
            "window_recomputed_tokens": s.stats.window_recomputed_tokens,
            # (a model with linear attention layers: the prefix cache's snapshots of their recurrent states)
            "state_snapshots_total": s.pages.snapshots.num_slots if s.pages.snapshots is not None else 0,
            "state_snapshots_used": len(s.pages.snapshots) if s.pages.snapshots is not None else 0,
            "host_state_snapshots_total": s.tiers.host_states.num_slots if s.tiers.host_states is not None else 0,
            "host_state_snapshots_used": len(s.tiers.host_states) if s.tiers.host_states is not None else 0,
            "host_state_hits": s.stats.host_state_hits,
            "host_saved_states": s.stats.host_saved_states,
            "disk_state_snapshots": len(getattr(self._disk, "states", None) or ()),
            "disk_state_hits": s.stats.disk_state_hits,
            "disk_saved_states": s.stats.disk_saved_states,
            "num_steps": self.num_steps,
            # (a model that takes images: those run through the vision tower; a cached image's positions need none)
            "images_encoded": self.runner.images.num_encoded if self.runner.images is not None else 0,
            "weights_version": self.weights_version,
            "weights_source": self.weights_source,
            "sleep_level": self.sleep_level,
        }


class EngineAsleep(RequestError):
    """A request sent while the engine sleeps (LLMEngine.sleep)."""


PROMPT_KEYS = ("prompt", "prompt_token_ids", "prompt_embeds")  # vLLM's TextPrompt, TokensPrompt, EmbedsPrompt


def _unpacked_prompt(prompt: Mapping, images: Seq | None) -> tuple[str | list[int] | Mapping, Seq | None]:
    """A prompt given as vLLM's prompt dict -> (its text, ids or {"prompt_embeds": rows}, its images): one of
    PROMPT_KEYS, and with text or ids optionally multi_modal_data {"image": one or a list} (in the order of the
    prompt's placeholders, as `images`)."""
    kinds = [k for k in PROMPT_KEYS if k in prompt]
    other = sorted(set(prompt) - {*PROMPT_KEYS, "multi_modal_data"})
    if len(kinds) != 1 or other:
        raise RequestError(f"a prompt given as a mapping holds one of {', '.join(PROMPT_KEYS)} (vLLM's TextPrompt, "
                           f"TokensPrompt, EmbedsPrompt) and optionally multi_modal_data; got {sorted(prompt)}")
    media = prompt.get("multi_modal_data")
    if media is None:
        return (prompt if kinds[0] == "prompt_embeds" else prompt[kinds[0]]), images
    if kinds[0] == "prompt_embeds":
        raise RequestError("a prompt given as embeddings takes no images (multi_modal_data)")
    if images:
        raise RequestError("images given twice: in multi_modal_data and as images")
    if not isinstance(media, Mapping) or set(media) != {"image"}:
        raise RequestError(f"multi_modal_data holds images only, {{'image': an image or a list of them}}; got "
                           f"{sorted(media) if isinstance(media, Mapping) else type(media).__name__}")
    image = media["image"]
    return prompt[kinds[0]], list(image) if isinstance(image, (list, tuple)) else [image]
