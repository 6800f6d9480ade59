"""NVFP4 checkpoints (models/fp4_checkpoint.py): compressed-tensors' `nvfp4-pack-quantized` (written by the
compressed-tensors library itself, read back by transformers as the reference) and ModelOpt's layout of the same codes
and scales load as the weights they stand for, dequantized; the engine serves their tokens, and quantizes them again
at load where asked."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine.config import EngineConfig
from engine.llm import LLM
from models.fp4_checkpoint import E2M1, fp4_method
from models.gguf_loader import CheckpointError
from models.loader import checkpoint_quantization, load_weights, tokenizer_source
from models.safetensors_loader import _numpy_float8
from models.tokenizer import Tokenizer
from scripts.ct_checkpoint import write_compressed_tensors
from tests.test_int_checkpoints import MODULES
from tests.test_weight_updates import GREEDY, SMOLLM2, _prompts
import fresh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
_numpy_float8()  # (safetensors' numpy reader names e4m3 by numpy's dtype of that name)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(tokenizer_source(SMOLLM2))


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    """A random Llama over SmolLM2's vocabulary (2 layers, 4 query heads and 1 KV head), float32."""
    torch.manual_seed(fresh.seed(key=f"{__name__}.hf_model"))
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


def _modelopt(ct_dir, directory) -> None:
    """compressed-tensors' NVFP4 checkpoint rewritten in ModelOpt's names: the codes as `<module>.weight`, the FP8
    scales as they are, the tensor's scale as `weight_scale_2` = 1 / weight_global_scale (ModelOpt multiplies by it,
    compressed-tensors divides), quant_algo NVFP4 in hf_quant_config.json and config.json."""
    directory.mkdir()
    out = {}
    for name, t in load_file(ct_dir / "model.safetensors").items():
        if name.endswith(".weight_packed"):
            out[name.replace(".weight_packed", ".weight")] = t
        elif name.endswith(".weight_global_scale"):
            out[name.replace(".weight_global_scale", ".weight_scale_2")] = (1 / t.astype(np.float64)).astype(np.float32)
        elif not name.endswith(".weight_shape"):
            out[name] = t
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ct_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                     "exclude_modules": ["lm_head"]}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}))


def test_nvfp4_checkpoints_load_as_the_weights_they_stand_for(hf_model, tokenizer, tmp_path):
    """An NVFP4 checkpoint written by compressed-tensors loads, dequantized, as transformers decompresses it (to within
    its bfloat16 arithmetic: ours is the exact product, code x FP8 scale / tensor scale, in float32); each weight is a
    code of E2M1's table times its group's scale; ModelOpt's layout of the same tensors loads the same (to float32's
    rounding of 1 / the tensor scale);
    `auto` keeps neither (no E2M1 kernel), and the LM head it left in float is read as it is."""
    from transformers import CompressedTensorsConfig

    ct, mo = tmp_path / "ct", tmp_path / "modelopt"
    write_compressed_tensors(hf_model, tokenizer, ct, "nvfp4")
    _modelopt(ct, mo)
    assert (fp4_method(str(ct)), fp4_method(str(mo))) == ("compressed-tensors", "modelopt")
    assert checkpoint_quantization(str(ct)) == checkpoint_quantization(str(mo)) == "none"
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        ct, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32).eval()
    state_dict = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    cfg, params = load_weights(str(ct))
    _, again = load_weights(str(mo))
    stored = load_file(ct / "model.safetensors")
    for key, module in MODULES.items():
        for i in range(cfg.num_layers):
            ours = np.asarray(params["layers"][key][i])
            np.testing.assert_allclose(np.asarray(again["layers"][key][i]), ours, rtol=2e-7, atol=0)
            np.testing.assert_allclose(ours, state_dict[f"model.layers.{i}.{module}.weight"].T, rtol=2**-7, atol=0)
            prefix = f"model.layers.{i}.{module}."
            scale = stored[prefix + "weight_scale"].astype(np.float32) / stored[prefix + "weight_global_scale"]
            codes = ours.T.reshape(scale.shape[0], -1, 16) / scale[..., None]  # [out, groups, 16]
            nearest = np.abs(np.abs(codes[scale > 0])[..., None] - E2M1).min(-1)
            assert nearest.max() < 1e-5
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), state_dict["lm_head.weight"].T)


@pytest.mark.slow
def test_an_nvfp4_checkpoint_serves_its_weights_tokens(hf_model, tokenizer, tmp_path):
    """The engine on an NVFP4 checkpoint (dequantized at load, with prefix hits) gives the greedy tokens of transformers
    on the weights it read; with `model.quantization: fp8` it quantizes them again at load and still serves."""
    write_compressed_tensors(hf_model, tokenizer, tmp_path, "nvfp4")
    _, params = load_weights(str(tmp_path))
    reference = transformers.LlamaForCausalLM(hf_model.config).eval()
    with torch.no_grad():
        for key, module in MODULES.items():
            for i in range(hf_model.config.num_hidden_layers):
                reference.model.layers[i].get_submodule(module).weight.copy_(
                    torch.as_tensor(np.asarray(params["layers"][key][i]).T))
        reference.model.embed_tokens.weight.copy_(hf_model.model.embed_tokens.weight)
        reference.lm_head.weight.copy_(hf_model.lm_head.weight)
        for i, layer in enumerate(hf_model.model.layers):
            reference.model.layers[i].input_layernorm.weight.copy_(layer.input_layernorm.weight)
            reference.model.layers[i].post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight)
    base = {"warmup": False, "model.path": str(tmp_path), "cache.page_size": 8, "cache.num_pages": 96,
            "scheduler.max_batch_tokens": 64, "scheduler.token_buckets": [16, 64], "model.max_model_len": 128}
    prompts = _prompts(tokenizer.vocab_size, fresh.seed())
    llm = LLM(EngineConfig().replace(**base), progress=False)
    assert llm.engine.config.model.quantization == "none"
    outs = llm.generate(prompts, GREEDY)
    assert sum(o.cached_tokens for o in outs) > 0
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(GREEDY.max_tokens):
                ids.append(int(reference(torch.as_tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(prompt):] == out.token_ids
    fp8 = LLM(EngineConfig().replace(**base, **{"model.quantization": "fp8"}), progress=False)
    assert "wq_scale" in fp8.engine.params["layers"]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in fp8.generate(prompts, GREEDY))


def test_fp4_layouts_it_cannot_read_are_refused_by_name(hf_model, tokenizer, tmp_path):
    """Another ModelOpt algorithm, compressed-tensors' 4-bit floats in groups of 32 (MXFP4's), codes that do not fit
    their scales: each a CheckpointError naming it."""
    ct, mo = tmp_path / "ct", tmp_path / "modelopt"
    write_compressed_tensors(hf_model, tokenizer, ct, "nvfp4")
    _modelopt(ct, mo)
    config = json.loads((mo / "config.json").read_text())
    (mo / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "modelopt",
                                                                                  "quant_algo": "W4A8_AWQ"}}))
    with pytest.raises(CheckpointError, match="quant_algo='W4A8_AWQ' is not supported"):
        load_weights(str(mo))
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    (ct / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="groups of \\[32\\] are not supported"):
        load_weights(str(ct))
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    (ct / "config.json").write_text(json.dumps(config))
    tensors = load_file(ct / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    save_file({**tensors, name: tensors[name][:, :2]}, ct / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.q_proj: NVFP4 codes uint8 \\(64, 32\\)"):
        load_weights(str(ct))


def test_a_modelopt_fp8_checkpoint_loads_as_its_scaled_weights_and_is_kept(hf_model, tmp_path):
    """ModelOpt's FP8 (quant_algo FP8: every projection e4m3 with one float32 `weight_scale` for the tensor, an
    `input_scale` for its activations, which is not read): dequantized, each weight is its code times the tensor's
    scale; `auto` serves it as stored (`fp8`: the e4m3 codes kept, the scale repeated per output feature)."""
    import ml_dtypes

    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    want = {}
    for i in range(hf_model.config.num_hidden_layers):
        for module in MODULES.values():
            name = f"model.layers.{i}.{module}.weight"
            scale = np.float32(np.abs(tensors[name]).max() / 448)
            tensors[name] = (tensors[name] / scale).astype(ml_dtypes.float8_e4m3fn)
            tensors[name + "_scale"] = np.asarray(scale)
            tensors[name.replace(".weight", ".input_scale")] = np.asarray(0.02, np.float32)
            want[name] = tensors[name].astype(np.float32) * scale
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = hf_model.config.to_dict() | {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_quantization(str(tmp_path)) == "fp8"
    cfg, params = load_weights(str(tmp_path))
    _, kept = load_weights(str(tmp_path), quantization="fp8")
    for key, module in MODULES.items():
        for i in range(cfg.num_layers):
            name = f"model.layers.{i}.{module}.weight"
            np.testing.assert_array_equal(np.asarray(params["layers"][key][i]), want[name].T)
            assert kept["layers"][key].dtype == ml_dtypes.float8_e4m3fn
            np.testing.assert_array_equal(np.asarray(kept["layers"][key][i]).astype(np.float32) * np.asarray(
                kept["layers"][key + "_scale"][i]), want[name].T)
