"""Engine-level fuzzing: random configurations on tiny random models, outputs against a plain run.

Each seed draws a model (a tiny Llama, a tiny Gemma 3 whose windowed layers see 12 tokens, a tiny gpt-oss: sinks,
experts, windowed layers of 12, a tiny DeepSeek-V3: a latent cache, a dense layer before expert ones, the same as
V3.2 with sparse attention (an indexer keeping 6 positions, its keys cached beside the RoPE keys), a tiny Llama 4:
chunks of 12 on its RoPE layers, experts weighted at their input on every other layer, a tiny Qwen3.5:
Gated DeltaNet layers around an attention layer, a few slots for its states' snapshots, a tiny Granite 4.0-H:
Mamba-2 layers, or a tiny Nemotron 3: Mamba-2 layers, ungated experts, layers without an MLP), a KV dtype, a page
size, a pool from one sequence's pages up, batch and chunk limits, a policy,
overlap, speculative decoding (n-gram chains and trees; the model as its own draft, chains and top-k trees), a hybrid cache's window slots, a host tier and a disk tier
(a second engine then starts on the first's files), and runs a shuffled subset of tests/test_engine.py's prompts
(shared prefixes, identical prompts, whole-prompt hits, namespaces), some seeds with token rules (few allowed ids,
bad words among them), with invariants checked every step (`debug_checks`); every fourth request also returns its
tokens' hidden states, which must be the plain run's rows. Some seeds also (`draw_features`) sample
(seeded top-p) instead of decoding greedily, give the requests priorities (scheduler.policy priority), serve two LoRA
adapters beside the base model, split the model over 2 CPU devices (tensor parallelism), speculate only in small
decode batches, or put images in prompts (a tiny random vision tower in front of the model). Every engine must give
the tokens of the same model run with the cache off, a big pool, serial steps and one device (two in a sampling seed
that splits the model: reductions in another order can move a seeded top-p draw across a token's edge). The scheduler's own
property test (tests/test_scheduler.py) covers far more configurations without a model; this covers the runner too
(buckets, page tables, copy-on-write, host and disk copies, window slots).

    .venv/bin/python scripts/fuzz_engine.py --seeds 0 200          # ~8 s a seed on 2 CPU cores
    .venv/bin/python scripts/fuzz_engine.py --seeds 0 5 --backend pallas_interpret
    .venv/bin/python scripts/fuzz_engine.py --seeds 0 300 --trees --models llama gemma3 deepseek gpt_oss
    .venv/bin/python scripts/fuzz_engine.py --seeds 0 100 --embeds                  # prompts given as embeddings

Exit status 1 if any seed fails; each failure prints its configuration.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # their helpers

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # two CPU devices: tensor parallelism
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"


def tiny_models(tokenizer) -> dict:
    import dataclasses

    import jax

    from models import llama
    from models.config import LlamaConfig

    llama_cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64,
                            intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                            max_position=1024)
    gemma_cfg = LlamaConfig(architecture="gemma3", vocab_size=tokenizer.vocab_size, hidden_size=64,
                            intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                            max_position=512, sliding_window=12, sliding_layers=(True, True, False, True),
                            rope_theta=1e6, rope_local_theta=1e4, hidden_act="gelu_tanh", qk_norm=True,
                            sandwich_norms=True, embed_scale=8.0)
    gpt_oss_cfg = LlamaConfig(architecture="gpt_oss", vocab_size=tokenizer.vocab_size, hidden_size=64,
                              intermediate_size=32, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                              max_position=512, attention_bias=True, attention_out_bias=True, attention_sinks=True,
                              sliding_window=12, sliding_layers=(True, False), hidden_act="swiglu_oai", num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=32, moe_bias=True)
    gpt_oss = llama.init_params(gpt_oss_cfg, jax.random.key(6), scale=0.5)
    sinks = jax.random.normal(jax.random.key(7), gpt_oss["layers"]["sinks"].shape) * 2  # sinks that take real weight
    # DeepSeek-V3-like: latent attention (a cache of RoPE keys and latents), a dense first layer, sigmoid group routing
    deepseek_cfg = LlamaConfig(architecture="deepseek_v3", vocab_size=tokenizer.vocab_size, hidden_size=64,
                               intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=1, head_dim=8 + 32,
                               max_position=512, query_pre_attn_scalar=24.0, kv_lora_rank=32, q_lora_rank=24,
                               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, num_experts=8,
                               num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               shared_expert_gate=False, moe_layers=(False, True, True), router_scoring="sigmoid",
                               router_score_bias=True, expert_groups=4, expert_groups_per_tok=2,
                               routed_scaling_factor=2.5)
    # DeepSeek-V3.2-like: the same with sparse attention, an indexer keeping 6 positions (its keys cached beside the
    # RoPE keys)
    deepseek_v32_cfg = dataclasses.replace(deepseek_cfg, index_topk=6, index_num_heads=8, index_head_dim=16)
    # Llama-4-like: chunks of 12 positions on the RoPE layers, a NoPE layer with the query temperature, unweighted
    # q/k norms, experts weighted at their input (top 1, a shared expert) on every other layer
    llama4_cfg = LlamaConfig(architecture="llama4", vocab_size=tokenizer.vocab_size, hidden_size=64,
                             intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                             max_position=512, rope_theta=500000.0, rope_layers=(True, True, True, False),
                             attention_chunk=12, chunked_layers=(True, True, True, False), qk_norm_unweighted=True,
                             nope_temperature=(16.0, 0.1), num_experts=4, num_experts_per_tok=1,
                             moe_intermediate_size=32, norm_topk_prob=False, shared_expert_intermediate_size=32,
                             shared_expert_gate=False, moe_layers=(False, True, False, True),
                             router_scoring="sigmoid", router_scales_input=True)
    qwen3_5_cfg = LlamaConfig(architecture="qwen3_5", vocab_size=tokenizer.vocab_size, hidden_size=64,
                              intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                              max_position=512, qk_norm=True, attn_output_gate=True, partial_rotary_factor=0.25,
                              linear_layers=(True, True, False, True), linear_num_key_heads=2, linear_num_value_heads=4,
                              linear_key_head_dim=8, linear_value_head_dim=12)
    granite4_cfg = LlamaConfig(architecture="granitemoehybrid", vocab_size=tokenizer.vocab_size, hidden_size=64,
                               intermediate_size=96, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                               max_position=512, rope_layers=(False,) * 4, residual_multiplier=0.7,
                               linear_kind="mamba2", linear_layers=(True, False, True, True), linear_num_key_heads=2,
                               linear_num_value_heads=8, linear_key_head_dim=16, linear_value_head_dim=16,
                               linear_conv_bias=True)
    # Qwen3-MoE-like: experts on every layer (stored one by one: LoRA adapters of the experts), q/k norms per head
    qwen3_moe_cfg = LlamaConfig(architecture="qwen3_moe", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                max_position=512, qk_norm=True, num_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=32, norm_topk_prob=True)
    # LFM2-like: short convolution layers (a convolution state per sequence) around attention layers
    lfm2_cfg = LlamaConfig(architecture="lfm2", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                           num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, qk_norm=True,
                           linear_kind="short_conv", linear_layers=(True, True, False, True), linear_conv_kernel=3)
    # Kimi-Linear-like: KDA layers (a decay per key channel) around a latent attention layer without RoPE, V3's experts
    kimi_linear_cfg = dataclasses.replace(
        deepseek_cfg, architecture="kimi_linear", num_layers=4, q_lora_rank=0, rope_layers=(False,) * 4,
        moe_layers=(False, True, True, True), linear_kind="kda", linear_layers=(True, True, False, True),
        linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
    # Nemotron-3-like: Mamba-2 and attention blocks, ungated experts (sigmoid routing with a correction bias in 2
    # groups, a shared expert) after some of them, layers without an MLP between (M E M * E M M E)
    nemotron_h_cfg = LlamaConfig(
        architecture="nemotron_h", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=32, num_layers=5,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, rope_layers=(False,) * 5, gated_mlp=False,
        hidden_act="relu2", linear_kind="mamba2", linear_layers=(True, True, False, True, True),
        mlp_layers=(True, False, True, False, True), linear_num_key_heads=2, linear_num_value_heads=8,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_bias=True, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, shared_expert_gate=False,
        router_scoring="sigmoid", router_score_bias=True, expert_groups=2, expert_groups_per_tok=1,
        routed_scaling_factor=2.5)
    return {"llama": (llama_cfg, llama.init_params(llama_cfg, jax.random.key(0), scale=0.5), tokenizer),
            "nemotron_h": (nemotron_h_cfg, llama.init_params(nemotron_h_cfg, jax.random.key(27), scale=0.5),
                           tokenizer),
            "kimi_linear": (kimi_linear_cfg, llama.init_params(kimi_linear_cfg, jax.random.key(25), scale=0.3),
                            tokenizer),
            "lfm2": (lfm2_cfg, llama.init_params(lfm2_cfg, jax.random.key(19), scale=0.5), tokenizer),
            "qwen3_moe": (qwen3_moe_cfg, llama.init_params(qwen3_moe_cfg, jax.random.key(17), scale=0.5), tokenizer),
            "qwen3_5": (qwen3_5_cfg, llama.init_params(qwen3_5_cfg, jax.random.key(11), scale=0.5), tokenizer),
            "granite4": (granite4_cfg, llama.init_params(granite4_cfg, jax.random.key(13), scale=0.5), tokenizer),
            "gemma3": (gemma_cfg, llama.init_params(gemma_cfg, jax.random.key(5), scale=0.5), tokenizer),
            "gpt_oss": (gpt_oss_cfg, {**gpt_oss, "layers": {**gpt_oss["layers"], "sinks": sinks}}, tokenizer),
            "deepseek": (deepseek_cfg, llama.init_params(deepseek_cfg, jax.random.key(9), scale=0.3), tokenizer),
            "deepseek_v32": (deepseek_v32_cfg, llama.init_params(deepseek_v32_cfg, jax.random.key(21), scale=0.3),
                             tokenizer),
            "llama4": (llama4_cfg, llama.init_params(llama4_cfg, jax.random.key(23), scale=0.5), tokenizer)}


MODELS = ("llama", "gemma3", "gpt_oss", "deepseek", "qwen3_5", "granite4", "qwen3_moe", "lfm2", "deepseek_v32",
          "llama4", "kimi_linear", "nemotron_h")
# models with linear attention layers (a recurrent state per sequence)
RECURRENT = ("qwen3_5", "granite4", "lfm2", "kimi_linear", "nemotron_h")
# models whose heads split over 2 devices
SPLIT = ("llama", "gemma3", "gpt_oss", "qwen3_5", "granite4", "qwen3_moe", "llama4", "lfm2", "kimi_linear",
         "nemotron_h")
# models the fuzzer gives LoRA adapters (of every projection they adapt: qwen3_moe's experts too)
ADAPTED = ("llama", "gemma3", "qwen3_5", "granite4", "qwen3_moe", "lfm2")
# models with experts (run on the grouped path in half their seeds)
EXPERTS = ("gpt_oss", "deepseek", "qwen3_moe", "deepseek_v32", "llama4", "kimi_linear", "nemotron_h")
GRID = ("llama", "gemma3", "gpt_oss", "qwen3_5")  # models the fuzzer may serve Qwen2.5-VL-style images with M-RoPE
DRAFTED = ("llama", "deepseek", "deepseek_v32")  # models the fuzzer may give themselves as draft models
WHOLE_PAGES = ("llama", "deepseek", "gemma3", "gpt_oss", "qwen3_moe", "deepseek_v32", "llama4")  # models whose pages another replica may send
# (no states)


def draw_features(seed: int, model: str) -> dict:
    """What the requests and replica add to a seed's configuration, from a generator of their own (a seed's
    configuration stays what it drew before these existed): seeded top-p sampling instead of greedy, priorities
    (scheduler.policy priority, preempting), two LoRA adapters beside the base model, tensor parallelism over 2 CPU
    devices, speculative.max_batch (with speculative decoding: no drafts in steps of more decodes than that, and on
    models with linear layers that many rows of draft state slots), images in two prompts of three (a tiny random
    vision tower in front of the model: two images, so that prompts share cached images and differ by them), as
    LLaVA-NeXT's tiles in half of those seeds, or (models in GRID) as Qwen2.5-VL's grid of patches with the model's
    RoPE made M-RoPE (`tiny_grid_vision`), or (in 2 of 5 seeds with neither) as Gemma 3's, whose positions attend to
    each other both ways; and in half the seeds that speculate (models in DRAFTED), the model as its own draft model
    in place of n-gram lookup (its trees of top-3 tokens where the seed drew n-gram trees); in half of the other seeds
    that speculate, suffix decoding in its place (trees where the seed drew n-gram trees, drafting from the other
    requests' answers, a small cache of them). In a third of the seeds of models in WHOLE_PAGES without images or a
    draft model, the prompts' pages come from another replica first (`_received`: parallel.kv_transfer jax, a
    plain engine of the same layout computes them and offers them, and the fuzzed engine pulls them over its transfer
    server and takes them with the requests). In half the seeds of models with experts, the fuzzed engine runs them as
    grouped matmuls (model.moe_backend grouped; the reference: dense, this CPU's default). In 3 of 10 seeds without
    images or pages from another replica, the fuzzed engine is given half the prompts (by their tokens, so identical
    prompts alike) as embeddings, the rows its first layer reads of their ids (model.enable_prompt_embeds)."""
    rng = random.Random(f"features {seed}")
    return {"sampling": rng.random() < 0.25, "priorities": rng.random() < 0.2,
            "lora": model in ADAPTED and rng.random() < 0.2,
            "tensor": 2 if model in SPLIT and rng.random() < 0.2 else 1,
            "spec_max_batch": rng.choice([0, 0, 1, 2, 3]),
            "images": rng.random() < 0.25, "anyres": rng.random() < 0.5,
            "grid": model in GRID and rng.random() < 0.4,
            "both_ways": rng.random() < 0.4 and model != "deepseek_v32",  # (sparse attention's top-k is causal)
            "drafter": model in DRAFTED and rng.random() < 0.5,
            "suffix": rng.random() < 0.5,
            "received": model in WHOLE_PAGES and rng.random() < 0.33,
            "grouped": model in EXPERTS and rng.random() < 0.5,
            "embeds": rng.random() < 0.3}


def tiny_vision(cfg, anyres: bool = False, both_ways: bool = False):
    """(VisionConfig, random params, ImageProcessor): a CLIP tower of 21-pixel images in 7-pixel patches (9
    positions each) into `cfg`'s hidden size, the placeholder its last id; and two images. anyres: LLaVA-NeXT's
    tiles on grids up to 2 x 2 (an image's positions from its size: 39 and 45 for these two). both_ways: Gemma 3's
    SigLIP tower and pooling projector (42-pixel images, 6 x 6 patches pooled to 9 positions that attend to each other
    both ways), framed by the ids before the placeholder."""
    import jax
    import numpy as np
    from PIL import Image

    from engine.images import ImageProcessor
    from models import vision

    tower = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=7, num_channels=3,
                 text_hidden_size=cfg.hidden_size, image_token_id=cfg.vocab_size - 1)
    if both_ways:
        vcfg = vision.VisionConfig(kind="siglip", **tower, image_size=42, layer_norm_eps=1e-6,
                                   hidden_act="gelu_pytorch_tanh", feature_layers=(-1,), select_strategy="full",
                                   projector_act="gelu", projector_bias=False, projector="gemma3", post_norm=True,
                                   num_pooled_tokens=9, boi_token_id=cfg.vocab_size - 3,
                                   eoi_token_id=cfg.vocab_size - 2)
        processor = ImageProcessor.from_dict({"image_processor_type": "Gemma3ImageProcessor", "size": 42})
    else:
        vcfg = vision.VisionConfig(kind="clip", **tower, image_size=21, layer_norm_eps=1e-5,
                                   hidden_act="quick_gelu", feature_layers=(-2,), select_strategy="default",
                                   projector_act="gelu", projector_bias=True,
                                   grid_pinpoints=((21, 42), (42, 21), (42, 42)) if anyres else (),
                                   image_newline=anyres)
        processor = ImageProcessor.from_dict({
            "image_processor_type": "LlavaNextImageProcessor" if anyres else "CLIPImageProcessor",
            "size": {"shortest_edge": 21}, "crop_size": {"height": 21, "width": 21},
            **({"image_grid_pinpoints": [[21, 42], [42, 21], [42, 42]], "do_pad": True} if anyres else {})})
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (30, 24 + 8 * i, 3), dtype=np.uint8)) for i in range(2)]
    return (vcfg, vision.init_params(vcfg, jax.random.key(17), scale=0.5), processor), images


def tiny_grid_vision(model: tuple, interleaved: bool):
    """((the model with M-RoPE, its params, tokenizer), (QwenVisionConfig, random params, QwenImageProcessor)) and two
    images: a Qwen2.5-VL tower of 8-pixel patches merged 2 x 2 in windows of 2 x 2 merge blocks, images of 2 to 30
    positions (these two: 24 and 20); the model's rotary pairs split over the temporal, height and width positions
    (interleaved: as Qwen3.5 lays them out)."""
    import dataclasses

    import jax
    import numpy as np
    from PIL import Image

    from engine.qwen_images import QwenImageProcessor
    from models import qwen_vision

    cfg, params, tokenizer = model
    pairs = cfg.rotary_dim // 2
    cfg = dataclasses.replace(cfg, mrope_section=(pairs - 2 * (pairs // 3), pairs // 3, pairs // 3),
                              mrope_interleaved=interleaved)
    vcfg = qwen_vision.QwenVisionConfig(
        kind="qwen2_5_vl", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, patch_size=8,
        temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="silu",
        out_hidden_size=cfg.hidden_size, image_token_id=cfg.vocab_size - 1, vision_start_token_id=0, window_size=32,
        fullatt_block_indexes=(1,))
    processor = QwenImageProcessor(min_pixels=2 * 16 * 16, max_pixels=30 * 16 * 16, patch_size=8)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 128 - 48 * i, 3), dtype=np.uint8)) for i in range(2)]
    vision = (vcfg, qwen_vision.init_params(vcfg, jax.random.key(19), scale=0.5), processor)
    return (cfg, params, tokenizer), vision, images


def _with_image(prompt: list[int], images: list, placeholder: int) -> tuple[list[int], list]:
    """Two prompts in three get an image after their first 4 tokens, chosen by their tokens (so identical prompts
    and those sharing a prefix share it, or differ by it)."""
    if images is None or sum(prompt) % 3 == 0:
        return prompt, []
    at = min(4, len(prompt))
    return prompt[:at] + [placeholder] + prompt[at:], [images[sum(prompt) % len(images)]]


def _image_kind(features: dict) -> str | None:
    """A seed's images beyond LLaVA's plain tiles: "grid" (Qwen2.5-VL's), "anyres", "both ways" (Gemma 3's, in 2 of
    5 seeds that draw neither), or None."""
    return "grid" if features["grid"] else "anyres" if features["anyres"] else \
        "both ways" if features["both_ways"] else None


def _received(source, target, prompts) -> list[tuple | None]:
    """Each prompt's pages as another replica sends them (prefill/decode disaggregation over the network): `source`
    (an LLM of the same layout, parallel.kv_transfer jax) computes every prompt, offers the pages its tree holds of
    each, and `target` pulls them -> per prompt, (the last page's block hash, the pages' payloads) or None."""
    import asyncio

    from engine.kv_transfer import offered_tokens, page_payloads
    from engine.request import SamplingParams

    ids = [source.engine.add_request(p, SamplingParams(max_tokens=1, temperature=0), namespace=ns) for p, ns in prompts]
    source._run(set(ids), progress=False)
    ps, out = source.engine.config.cache.page_size, []
    for prompt, namespace in prompts:
        offer = source.engine.transfer.offer(offered_tokens(prompt, ps), namespace)
        if offer is None:
            out.append(None)
            continue
        arrays = asyncio.run(target.engine.transfer.endpoint.pull(
            source.engine.transfer.endpoint.address, offer["uuid"], target.engine.transfer.specs(offer["padded"]), 60))
        out.append((offer["last_hash"], page_payloads(arrays, offer["pages"]), offer["window_from"]))
    return out


def _generate(llm, prompts, max_tokens: int, features: dict, rules: dict, images=None,
              received=None, embeds: bool = False) -> list[tuple[list[int], np.ndarray | None]]:
    """Each prompt's (tokens, and for every fourth request their final hidden states): greedy, or seeded top-p
    sampling (`features`), with each request's priority and adapter drawn from its index (the same in every engine of
    a seed); `images` (a model that takes them): `_with_image`;
    `received`: per prompt, its pages from another replica (`_received`), given with the request; `embeds`: a prompt
    whose token ids sum to an even number given as its rows (`LLM.token_embeddings`)."""
    from engine.request import SamplingParams

    engine, ids = llm.engine, []
    for i, (prompt, namespace) in enumerate(prompts):
        sampled = dict(temperature=0.8, top_p=0.9, seed=1000 + i) if features["sampling"] else dict(temperature=0)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, return_hidden_states=i % 4 == 1, **sampled,
                                **rules)
        prompt, prompt_images = _with_image(prompt, images, engine.image_prompts and engine.image_prompts.placeholder_id)
        if embeds and sum(prompt) % 2 == 0:
            prompt = {"prompt_embeds": llm.token_embeddings(prompt)}
        ids.append(engine.add_request(prompt, params, namespace=namespace,
                                      priority=(i * 7) % 3 if features["priorities"] else 0,
                                      adapter=(None, "a", "b")[i % 3] if features["lora"] else None,
                                      images=prompt_images or None))
        if received is not None and received[i] is not None:
            engine.receive_prompt_pages(ids[-1], *received[i])
    finals = llm._run(set(ids), progress=False)
    return [(finals[i].token_ids, finals[i].hidden_states) for i in ids]


def _hidden_differs(got, want) -> bool:
    """Whether two runs' hidden states of the same tokens differ by more than rounding: any row off by over 5% of its
    norm (K/V rounded to int8 in other batch shapes moves them ~1e-3; a row of another position, by ~1)."""
    if (got is None) != (want is None):
        return True
    if got is None or len(got) == 0:
        return False
    return got.shape != want.shape or bool(
        np.any(np.linalg.norm(got - want, axis=-1) > 0.05 * np.maximum(np.linalg.norm(want, axis=-1), 1e-6)))


def draw(rng: random.Random, backend: str, models: tuple[str, ...] = MODELS) -> tuple[str, dict, dict, int]:
    """-> (model, the plain reference's overrides, the fuzzed engine's, max_tokens)."""
    model = rng.choice(models)
    page_size, max_model_len = rng.choice([4, 8, 16]), 128
    base = {"warmup": False, "model.max_model_len": max_model_len, "cache.page_size": page_size,
            "cache.kv_dtype": rng.choice(["auto", "auto", "int8"])}
    reference = {**base, "cache.num_pages": 256, "cache.prefix_caching": False, "scheduler.overlap": False,
                 "scheduler.max_batch_tokens": 128, "scheduler.max_running": 8}
    least = -(-max_model_len // page_size)
    max_batch_tokens = rng.choice([16, 32, 64, 128])
    fuzzed = {**base, "debug_checks": True, "attention.backend": backend,
              "cache.num_pages": rng.choice([least, least + 4, least * 2, 256]),
              "scheduler.max_batch_tokens": max_batch_tokens,
              "scheduler.max_running": rng.randint(1, min(8, max_batch_tokens)),
              "scheduler.long_prefill_tokens": rng.choice([0, 0, 8, 20]),
              "scheduler.policy": rng.choice(["fcfs", "lpm"]),
              "scheduler.overlap": rng.choice([True, False])}
    if model in RECURRENT:
        fuzzed["cache.state_snapshots"] = rng.choice([0, 1, 2, 5])
        if rng.random() < 0.4:  # a host tier keeping the snapshots the device lets go beside the pages
            fuzzed.update({"cache.host_num_pages": rng.choice([4, 16]),
                           "cache.host_state_snapshots": rng.choice([0, 1, 3])})
    if rng.random() < 0.3:
        fuzzed.update({"speculative.method": "ngram", "speculative.num_tokens": rng.choice([1, 3, 5]),
                       "speculative.ngram_branches": rng.choice([1, 1, 3])})  # 3: draft trees
    if model in ("gemma3", "gpt_oss") and rng.random() < 0.7:
        fuzzed["cache.window_pages"] = rng.choice([0, 6, 10, 20])
    if model in ("llama", "deepseek") and rng.random() < 0.3:
        fuzzed["cache.host_num_pages"] = rng.choice([4, 16])
    return model, reference, fuzzed, rng.choice([4, 10, 20])


def run_seed(seed: int, models: dict, tokenizer, backend: str, only: tuple[str, ...] = MODELS) -> tuple[str | None, str]:
    """-> (None if the seed passes, else what went wrong; what it ran beyond the engine's configuration)."""
    from engine.config import EngineConfig
    from engine.llm import LLM
    from models.lora import write_random_adapter
    from tests.test_engine import _prompts

    rng = random.Random(seed)
    model, reference, fuzzed, max_tokens = draw(rng, backend, only)
    prompts = _prompts(tokenizer, random.Random(seed))
    prompts = rng.sample(prompts, rng.randrange(6, len(prompts)))
    rules = {}
    if rng.random() < 0.3:  # few allowed ids, and bad words among them, so that bans fire every few tokens
        allowed = rng.sample(range(3, 2000), 40)
        rules = {"allowed_token_ids": tuple(allowed),
                 "bad_words": tuple(tokenizer.decode(rng.sample(allowed, rng.choice([1, 2]))) for _ in range(6))}
        rules["bad_words"] = tuple(w for w in rules["bad_words"] if w.strip())
    features = draw_features(seed, model)
    extra = ", ".join([*(["token rules"] if rules else []), *(k for k in ("sampling", "priorities", "lora", "images")
                                                              if features[k]), *(["tp 2"] if features["tensor"] > 1 else []),
                       *([_image_kind(features)] if features["images"] and _image_kind(features) else [])])
    served = models[model]
    if features["images"] and features["grid"]:
        served, vision, images = tiny_grid_vision(served, interleaved=model == "qwen3_5")
    else:
        both_ways = _image_kind(features) == "both ways"
        vision, images = tiny_vision(models[model][0], features["anyres"], both_ways) \
            if features["images"] else (None, None)
        if both_ways and 0 < fuzzed["scheduler.long_prefill_tokens"] < 9:  # (an image's 9 positions in one step)
            fuzzed["scheduler.long_prefill_tokens"] = 9
    disk = tempfile.mkdtemp(prefix="radixlm-fuzz-") if rng.random() < 0.3 else None
    if disk:
        fuzzed["cache.disk_path"] = disk
    fuzzed["parallel.tensor"] = features["tensor"]
    if features["grouped"]:
        fuzzed["model.moe_backend"] = "grouped"
        extra += (", " if extra else "") + "grouped experts"
    if features["sampling"]:  # 2 devices sum in another order: a seeded draw near a top-p edge may land elsewhere, so
        reference["parallel.tensor"] = features["tensor"]  # a sampling seed's reference splits alike (greedy: 1)
    if "speculative.method" in fuzzed:
        fuzzed["speculative.max_batch"] = features["spec_max_batch"]
    draft = None
    if "speculative.method" in fuzzed and features["drafter"] and not features["images"]:
        fuzzed.update({"speculative.method": "draft_model", "speculative.ngram_branches": 1,
                       "speculative.topk": 3 if fuzzed["speculative.ngram_branches"] > 1 else 1})
        draft = served[:2]
        extra += (", " if extra else "") + f"draft model (topk {fuzzed['speculative.topk']})"
    elif "speculative.method" in fuzzed and features["suffix"]:
        trees = fuzzed.pop("speculative.ngram_branches") > 1
        fuzzed.update({"speculative.method": "suffix", "speculative.suffix_trees": trees, "speculative.ngram_min": 1,
                       "speculative.num_tokens": fuzzed["speculative.num_tokens"] * (3 if trees else 1),
                       "speculative.suffix_max_cached_requests": 4, "speculative.suffix_min_prob": 0.05})
        extra += (", " if extra else "") + f"suffix decoding ({'trees' if trees else 'chains'})"
    source = None  # the replica that sends the prompts' pages (features["received"])
    if features["received"] and not features["images"] and draft is None:
        fuzzed["parallel.kv_transfer"] = "jax"
        source = {**reference, "cache.prefix_caching": True, "parallel.kv_transfer": "jax",
                  "parallel.tensor": features["tensor"], "attention.backend": backend, "cache.num_pages": 256}
        extra += (", " if extra else "") + "pages from another replica"
    embeds = features["embeds"] and not features["images"] and source is None
    if embeds:
        fuzzed["model.enable_prompt_embeds"] = True
        extra += (", " if extra else "") + "prompt embeddings"
    if features["priorities"]:  # (the reference too: a request with a priority needs the policy)
        reference["scheduler.policy"] = fuzzed["scheduler.policy"] = "priority"
    adapters = tempfile.mkdtemp(prefix="radixlm-fuzz-lora-") if features["lora"] else None
    if adapters:
        cfg = models[model][0]
        paths = {name: write_random_adapter(os.path.join(adapters, name), cfg, rank=4, alpha=8.0, seed=seed + i,
                                            std=0.1) for i, name in enumerate(("a", "b"))}
        reference["lora.adapters"] = fuzzed["lora.adapters"] = paths
    try:
        want = _generate(LLM(EngineConfig().replace(**reference), progress=False, model=served, vision=vision),
                         prompts, max_tokens, features, rules, images)
        for _ in range(2 if disk else 1):  # with a disk tier, a second engine starts on the first's files
            llm = LLM(EngineConfig().replace(**fuzzed), progress=False, model=served, vision=vision, draft=draft)
            received = None
            if source is not None:
                sender = LLM(EngineConfig().replace(**source), progress=False, model=served)
                received = _received(sender, llm, prompts)
            got = _generate(llm, prompts, max_tokens, features, rules, images, received, embeds)
            held = llm.engine.stats()["pages_held_by_requests"]
            if source is not None:
                extra += f" ({llm.engine.stats()['transfer_hit_tokens']} tokens taken)"
            llm.engine.shutdown()
            diff = [i for i, ((a, _), (b, _)) in enumerate(zip(got, want)) if a != b]
            if diff:
                return f"{model} {fuzzed} {rules}: outputs differ from the plain run at prompts {diff[:5]}", extra
            off = [i for i, ((_, a), (_, b)) in enumerate(zip(got, want)) if _hidden_differs(a, b)]
            if off:
                return f"{model} {fuzzed} {rules}: hidden states differ from the plain run at prompts {off[:5]}", extra
            if held:
                return f"{model} {fuzzed}: {held} pages still held by finished requests", extra
    except Exception as e:  # noqa: BLE001 (a crash is a finding too)
        traceback.print_exc()
        return f"{model} {fuzzed} {rules}: {type(e).__name__}: {str(e)[:300]}", extra
    finally:
        for path in (disk, adapters):
            if path:
                shutil.rmtree(path, ignore_errors=True)
    return None, extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 20), metavar=("FIRST", "END"))
    ap.add_argument("--backend", default="xla", choices=["xla", "pallas_interpret"])
    ap.add_argument("--models", nargs="*", default=MODELS, choices=MODELS, help="draw only from these")
    ap.add_argument("--trees", action="store_true", help="run only the seeds that draw draft trees (n-gram ones, or "
                    "a draft model's top-k trees)")
    ap.add_argument("--suffix", action="store_true", help="run only the seeds that draw suffix decoding")
    ap.add_argument("--received", action="store_true", help="run only the seeds whose prompts' pages come from "
                    "another replica")
    ap.add_argument("--embeds", action="store_true", help="run only the seeds that give prompts as embeddings")
    args = ap.parse_args(argv)

    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer
    from tests.test_engine import SMOLLM2

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    models = tiny_models(tokenizer)
    failures = 0
    seeds = range(*args.seeds)
    if args.trees:
        seeds = [s for s in seeds if draw(random.Random(s), args.backend, tuple(args.models))[2].get(
            "speculative.ngram_branches", 1) > 1]
    if args.suffix:
        def suffix(seed: int) -> bool:
            model, _, fuzzed, _ = draw(random.Random(seed), args.backend, tuple(args.models))
            features = draw_features(seed, model)
            return ("speculative.method" in fuzzed and features["suffix"]
                    and not (features["drafter"] and not features["images"]))
        seeds = [s for s in seeds if suffix(s)]
    def received(seed: int) -> bool:
        model, _, fuzzed, _ = draw(random.Random(seed), args.backend, tuple(args.models))
        features = draw_features(seed, model)
        return (features["received"] and not features["images"]
                and not ("speculative.method" in fuzzed and features["drafter"]))

    if args.received:
        seeds = [s for s in seeds if received(s)]
    if args.embeds:
        def embeds(seed: int) -> bool:
            features = draw_features(seed, draw(random.Random(seed), args.backend, tuple(args.models))[0])
            return features["embeds"] and not features["images"] and not received(seed)
        seeds = [s for s in seeds if embeds(s)]
    for seed in seeds:
        t0 = time.perf_counter()
        problem, extra = run_seed(seed, models, tokenizer, args.backend, tuple(args.models))
        failures += problem is not None
        print(f"seed {seed}: {'ok' if problem is None else 'FAIL ' + problem} ({time.perf_counter() - t0:.0f} s"
              f"{', ' + extra if extra else ''})", flush=True)
    print(f"{len(seeds)} seeds, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
