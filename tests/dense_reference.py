"""The non-paged reference forward of one sequence, padded to a bucket so that sequences of many lengths share a
compile (tests check the engine against it token by token, at lengths that change with every step)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models import llama


def dense_logits(params, cfg, ids, multiple: int = 64) -> np.ndarray:
    """Logits [len(ids), vocab] of `llama.forward_dense` over `ids` followed by zeros up to a multiple of `multiple`:
    attention is causal, so no position sees the padding after it and the rows are the unpadded sequence's. Callers
    put `params` on the device once (as a loop of calls would otherwise copy them every time)."""
    n = len(ids)
    padded = jnp.asarray(list(ids) + [0] * (-n % multiple), jnp.int32)
    return np.asarray(llama.forward_dense(params, cfg, padded))[:n]
