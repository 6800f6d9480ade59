"""A step's host arrays on their way to the device: one flat buffer per dtype instead of one transfer per array.

A decode step's inputs are ~17 small arrays (token ids, positions, page table, sampling parameters, ...). Each
array put on the device costs a transfer and, in JAX, ~10 us of Python; at batch 256 that is host work of every
step. `Packed.of(tree)` concatenates the leaves of each dtype into one buffer; jitted code calls `unpack` and gets
the tree back as static slices of those buffers (XLA fuses them into their readers). The layout, the leaves'
dtypes, offsets and shapes, is the pytree's static part: a computation compiles once per layout, as it did once
per shape.
"""
from __future__ import annotations

import math

import jax
import numpy as np


@jax.tree_util.register_pytree_node_class
class Packed:
    """A pytree of arrays stored as one 1-D buffer per dtype (`of`), and unpacked inside jitted code (`unpack`)."""

    def __init__(self, buffers: tuple, layout: tuple):
        self.buffers = buffers  # one per dtype (the dtypes are the buffers': jit keys on them already)
        self.layout = layout  # (treedef, ((buffer index, offset, shape) per leaf))

    @classmethod
    def of(cls, tree) -> Packed:
        """The host arrays of `tree` (None leaves stay None), one buffer per dtype."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        groups: dict[np.dtype, list[np.ndarray]] = {}
        slots = []
        for leaf in leaves:
            a = np.asarray(leaf)
            group = groups.setdefault(a.dtype, [])
            slots.append((list(groups).index(a.dtype), sum(x.size for x in group), a.shape))
            group.append(a.reshape(-1))
        buffers = tuple(np.concatenate(g) if len(g) > 1 else g[0] for g in groups.values())
        return cls(buffers, (treedef, tuple(slots)))

    def unpack(self):
        """The tree again, each leaf a slice of its dtype's buffer (in jitted code: static slices)."""
        treedef, slots = self.layout
        leaves = [self.buffers[i][offset : offset + math.prod(shape)].reshape(shape) for i, offset, shape in slots]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout, buffers):
        return cls(tuple(buffers), layout)


def unpacked(tree):
    """`tree`, or the tree a `Packed` holds."""
    return tree.unpack() if isinstance(tree, Packed) else tree
