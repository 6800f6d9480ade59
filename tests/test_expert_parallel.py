"""Expert parallelism (`parallel.expert`, models/moe.py `expert_parallel_moe`): the experts whole on the devices of a
tensor-parallel mesh, E / N each. One layer equals the one-device layer on fresh random input (every routing, biases,
8-bit and 4-bit experts, both paths, the Pallas grouped kernel); the engine's greedy tokens equal one device's with
hits and preemption; each device holds 1/N of the experts; an expert size no tensor-parallel layout splits runs;
expert counts that do not split are refused by name."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from engine.llm import LLM
from engine.request import SamplingParams
from models import moe, quant, sharding
from models.config import LlamaConfig
from test_parallel import _run, tiny_deepseek, tiny_glm4_moe, tiny_gpt_oss, tiny_qwen2_moe
import fresh

EP = {"parallel.expert": True}


def _layer(rng, e: int, h: int, i: int, biases: bool, score_bias: bool) -> dict:
    p = {"router": rng.normal(size=(h, e)), "moe_gate": rng.normal(size=(e, h, i)) * 0.3,
         "moe_up": rng.normal(size=(e, h, i)) * 0.3, "moe_down": rng.normal(size=(e, i, h)) * 0.3}
    if biases:  # gpt-oss's
        p |= {"router_bias": rng.normal(size=e), "moe_gate_bias": rng.normal(size=(e, i)),
              "moe_up_bias": rng.normal(size=(e, i)), "moe_down_bias": rng.normal(size=(e, h))}
    if score_bias:  # DeepSeek-V3's correction bias, big enough to change the choice
        p[moe.SCORE_BIAS] = rng.normal(size=e)
    return {k: np.asarray(v, np.float32) for k, v in p.items()}


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("case", ["float", "int8", "int4", "mxfp4", "int8-kernel"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "dense"])
def test_a_layer_equals_one_devices(devices, case, grouped):
    """Fresh random tokens, router and experts: softmax or sigmoid routing with groups, a correction bias, biases,
    top 1 to 3 of 8 experts, token counts from 1; quantized experts (their scales, offsets, exponents split with
    them); on the grouped path the 8-bit experts also through the Pallas grouped kernel, interpreted, per device."""
    if case == "int8-kernel" and not grouped:
        pytest.skip("the grouped kernel runs on the grouped path")
    rng = fresh.rng()
    e, h, i = 8, 32, int(rng.choice([32, 64]))
    t = int(rng.choice([1, 5, 24]))
    groups = int(rng.choice([1, 2, 4]))
    routing = moe.Routing(top_k=int(rng.integers(1, 4)), norm_topk_prob=bool(rng.integers(2)),
                          scoring=str(rng.choice(moe.SCORINGS)), groups=groups,
                          groups_per_tok=int(rng.integers(1, groups + 1)) if groups > 1 else 1)
    if routing.top_k > routing.groups_per_tok * e // groups:
        routing = moe.Routing(top_k=1, scoring=routing.scoring, groups=groups, groups_per_tok=routing.groups_per_tok)
    layer = _layer(rng, e, h, i, biases=bool(rng.integers(2)), score_bias=bool(rng.integers(2)))
    method = case.removesuffix("-kernel")
    if method != "float":
        layer = {k: v[0] for k, v in quant.quantize_params(
            {"layers": {k: v[None] for k, v in layer.items()}}, method, group_size=32)["layers"].items()}
    p = {k: jnp.asarray(v) for k, v in layer.items()}
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    kernels = "pallas_interpret" if case == "int8-kernel" else "none"
    want = jax.jit(lambda x, p: moe.moe_mlp(x, p, routing, moe.swiglu, grouped, quant_kernels=kernels))(x, p)

    mesh = sharding.make_mesh(devices)
    cfg = LlamaConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=h, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=4, head_dim=8, num_experts=e, num_experts_per_tok=routing.top_k,
                      moe_intermediate_size=i, expert_parallel=True)
    specs = sharding.param_specs(cfg, {"layers": {k: v[None] for k, v in layer.items()}}, devices)["layers"]
    split = {k: jax.device_put(v, NamedSharding(mesh, jax.sharding.PartitionSpec(*specs[k][1:])))
             for k, v in p.items()}
    for k, v in split.items():  # every per-expert array by its expert; the router's replicated
        assert v.addressable_shards[0].data.shape[0] == (e // devices if k.startswith("moe_") else v.shape[0]), k
    got = jax.jit(lambda x, p: moe.moe_mlp(x, p, routing, moe.swiglu, grouped, quant_kernels=kernels, mesh=mesh,
                                           expert_parallel=True))(x, split)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, devices, backend", [(tiny_qwen2_moe, 4, "grouped"), (tiny_gpt_oss, 2, "dense"),
                                                          (tiny_glm4_moe, 4, "dense"), (tiny_deepseek, 2, "grouped")],
                         ids=["qwen2_moe", "gpt_oss", "glm4_moe", "deepseek"])
def test_greedy_tokens_equal_one_devices_with_hits_and_preemption(make_model, devices, backend):
    """A gated shared expert, biases and windowed layers, expert groups and a dense first layer, latent attention:
    the greedy tokens of one device, on either path, in a 16-page pool that preempts, with prefix hits."""
    model = make_model()
    ref, engine1 = _run(model, 1, num_pages=16)
    assert engine1.stats()["num_preemptions"] > 0 and engine1.stats()["cached_prompt_tokens"] > 0
    out, engine = _run(model, devices, num_pages=16, **EP, **{"model.moe_backend": backend})
    assert engine.model_cfg.expert_parallel and engine.model_cfg.moe_grouped == (backend == "grouped")
    assert out == ref, f"expert parallel over {devices} devices ({backend}) changed greedy outputs"
    assert engine.stats()["num_preemptions"] > 0
    assert tuple(engine.params["layers"]["moe_up"].sharding.spec) == (None, "tp")


def test_int4_experts_identical_at_1_and_4():
    """4-bit experts split by expert with their scales and offsets: one device's greedy tokens. (Split by features,
    int4's groups of inputs would have to divide over the devices too; here each expert is whole.)"""
    model = tiny_qwen2_moe()
    q = {"model.quantization": "int4", "model.quantization_group_size": 8}
    ref, _ = _run(model, 1, num_pages=16, **q)
    out, engine = _run(model, 4, num_pages=16, **EP, **q)
    assert out == ref
    layers = engine.params["layers"]
    assert layers["moe_down"].dtype == np.dtype("uint4")
    for name in [k for k in layers if k.startswith("moe_down")]:
        assert tuple(layers[name].sharding.spec) == (None, "tp"), name


def test_each_device_holds_a_share_of_the_experts_whole():
    """Experts of 18 features, which 4 devices do not split (tensor parallelism refuses them by name), run whole: a
    quarter of the experts' bytes on each device, and one device's tokens; 6 experts over 4 devices are refused."""
    import dataclasses

    cfg, params, tokenizer = tiny_qwen2_moe()
    cfg = dataclasses.replace(cfg, moe_intermediate_size=18)
    params = {**params, "layers": {**params["layers"]}}
    for name in ("moe_gate", "moe_up", "moe_down"):
        w = params["layers"][name]
        params["layers"][name] = w[..., :18] if name != "moe_down" else w[:, :, :18, :]
    model = (cfg, params, tokenizer)
    with pytest.raises(sharding.ShardingError, match="moe_intermediate_size=18 is not divisible by parallel.tensor=4"):
        _run(model, 4, num_pages=16)
    ref, engine1 = _run(model, 1, num_pages=16)
    out, engine = _run(model, 4, num_pages=16, **EP)
    assert out == ref
    experts = {k: v for k, v in engine.params["layers"].items() if k.startswith("moe_")}
    whole = sum(sharding.array_bytes(v) for v in experts.values())
    assert set(sharding.bytes_per_device(experts).values()) == {whole // 4}
    six = dataclasses.replace(cfg, num_experts=6)
    with pytest.raises(sharding.ShardingError, match="num_experts=6 is not divisible by parallel.tensor=4"):
        sharding.prepare_for_tensor_parallel(six, {"layers": {}}, 4, experts=True)


@pytest.mark.slow
def test_an_mtp_layer_with_experts_splits_as_the_model():
    """GLM-4.5's MTP layer is an expert layer: under expert parallelism its experts split by expert as the model's,
    and speculative decoding with it gives one device's plain tokens."""
    import random

    from engine.config import EngineConfig
    from models import mtp
    from test_draft_model import split_model_whole_drafter
    from test_engine import SMALL, _prompts

    model = tiny_glm4_moe()
    cfg, params, tokenizer = model
    layer = (mcfg := mtp.mtp_config(cfg), mtp.init_params(mcfg, jax.random.key(1), scale=0.5))
    assert mcfg.layer.num_experts == cfg.num_experts
    prompts = _prompts(tokenizer, random.Random(27))[:8]
    sampling = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    base = EngineConfig().replace(**{**SMALL, "cache.num_pages": 32})
    llm = LLM(base, progress=False, model=model)
    ids = [llm.engine.add_request(p, sp, namespace=ns) for (p, ns), sp in zip(prompts, sampling)]
    finals = llm._run(set(ids), progress=False)
    spec = base.replace(**{**EP, "parallel.tensor": 4, "speculative.method": "mtp", "speculative.num_tokens": 2})
    def experts_split_by_expert(engine):
        assert tuple(engine.draft.weights.params["layers"]["moe_up"].sharding.spec) == (None, "tp")
        assert engine.draft.cfg.expert_parallel

    split_model_whole_drafter(spec, model, layer, prompts, sampling, [finals[i] for i in ids], drafter_split=True,
                              check=experts_split_by_expert)
