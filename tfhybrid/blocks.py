"""Kernels cut into blocks: their layout, the kinds of block, and what they store.

Blocks lie in the plane of a kernel's input and output axes, at each kernel position:
`block=(rows, cols)` spans `rows` input channels and `cols` output channels (as
TF-MOT's `block_size` does for a Dense kernel); `block="kernel"` is one input-output
pair's whole k x k slice. Where the channels do not divide into blocks, the last block
along an axis is shorter (as if padded with zeros that are never stored).

A block is *free* (float32 weights), *unified* (one magnitude, each weight its own
sign) or *pruned* (all zero). `tfhybrid.techniques.unify` trains kernels into this
form; the cost model counts its storage (`BlockShares`) and `tfhybrid.export.compact`
writes it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfhybrid._keras import keras

#: The layers whose kernels are cut into blocks (exactly these classes).
BLOCKED_LAYERS = (keras.layers.Dense, keras.layers.Conv2D)

FREE, UNIFIED, PRUNED = 0, 1, 2


class BlockLayout:
    """How a kernel of `shape` is cut into blocks of `block` (see the module).

    Args:
        shape: the kernel's shape, (..., inputs, outputs).
        block: (rows, cols) over the inputs and outputs, or "kernel".
    """

    def __init__(self, shape: tuple, block: tuple | str):
        self.shape = tuple(int(d) for d in shape)
        *spatial, inputs, outputs = self.shape
        self.positions = math.prod(spatial)
        self.block = block
        if block == "kernel":
            self.size = self.positions
            self.count = inputs * outputs
        else:
            rows, cols = block
            self.padded = (-(-inputs // rows) * rows, -(-outputs // cols) * cols)
            self.size = rows * cols
            self.count = self.positions * self.padded[0] // rows * self.padded[1] // cols
        self.valid = self.blocks(tf.ones(self.shape))

    def blocks(self, kernel: tf.Tensor) -> tf.Tensor:
        """The kernel as a (blocks, weights per block) matrix, padded with zeros."""
        *_, inputs, outputs = self.shape
        flat = tf.reshape(kernel, (self.positions, inputs, outputs))
        if self.block == "kernel":
            return tf.transpose(tf.reshape(flat, (self.positions, -1)))
        rows, cols = self.block
        pad = [[0, 0], [0, self.padded[0] - inputs], [0, self.padded[1] - outputs]]
        grid = tf.reshape(
            tf.pad(flat, pad),
            (self.positions, self.padded[0] // rows, rows, self.padded[1] // cols, cols),
        )
        return tf.reshape(tf.transpose(grid, (0, 1, 3, 2, 4)), (self.count, self.size))

    def kernel(self, blocks: tf.Tensor) -> tf.Tensor:
        """The kernel that `blocks` (as `blocks` returns them) cut up."""
        *_, inputs, outputs = self.shape
        if self.block == "kernel":
            return tf.reshape(tf.transpose(blocks), self.shape)
        rows, cols = self.block
        grid = tf.reshape(
            blocks, (self.positions, self.padded[0] // rows, self.padded[1] // cols, rows, cols)
        )
        padded = tf.reshape(tf.transpose(grid, (0, 1, 3, 2, 4)), (self.positions, *self.padded))
        return tf.reshape(padded[:, :inputs, :outputs], self.shape)

    @property
    def weights_per_block(self) -> float:
        """The kernel's weights over its blocks: less than `size` where edge blocks are
        shorter (what the cost model counts a block's code and magnitude over)."""
        return math.prod(self.shape) / self.count

    def block_counts(self, unify: float, prune: float) -> tuple[int, int]:
        """(unified, pruned) numbers of blocks for the shares."""
        pruned = round(prune * self.count)
        return min(round(unify * self.count), self.count - pruned), pruned


def signs(values: tf.Tensor) -> tf.Tensor:
    """+1 or -1 per value (+1 for zero, so a unified block's zeros take its magnitude)."""
    return tf.where(values >= 0, 1.0, -1.0)


@dataclasses.dataclass(frozen=True)
class BlockShares:
    """A kernel in blocks as the cost model counts it, per kernel entry.

    Attributes:
        blocks: blocks per entry (each stores a code saying its kind).
        unified: share of the entries in unified blocks (a sign bit each).
        pruned: share of the entries in pruned blocks (nothing stored).
        magnitudes: unified blocks per entry (a float32 magnitude each).
    """

    blocks: float
    unified: float
    pruned: float
    magnitudes: float

    @classmethod
    def planned(cls, layout: BlockLayout, unify: float, prune: float) -> BlockShares:
        """The shares for `unify` and `prune` of the blocks, blocks of average size."""
        per_entry = 1.0 / layout.weights_per_block
        return cls(per_entry, unify, prune, unify * per_entry)

    @classmethod
    def measured(
        cls, layout: BlockLayout, kinds: np.ndarray, kept: np.ndarray | None = None
    ) -> BlockShares:
        """The shares of a kernel whose blocks have `kinds`, counting per block only its
        `kept` weights (None: all of them; a block with none does not count)."""
        # Whole counts in float64: the shares then add up to 1 exactly where no block is
        # free, and the kinds' code is counted right.
        weights = (layout.valid.numpy().sum(1) if kept is None else np.asarray(kept)).astype(
            np.float64
        )
        entries = weights.sum()
        unified = (kinds == UNIFIED) & (weights > 0)
        return cls(
            float(np.sum(weights > 0) / entries),
            float(weights[unified].sum() / entries),
            float(weights[(kinds == PRUNED) & (weights > 0)].sum() / entries),
            float(np.sum(unified) / entries),
        )

    def bits_per_entry(self) -> float:
        """32 per free weight, a sign bit per unified one, 32 per magnitude, and each
        block's code (1 bit for two kinds, 2 for three, none for one)."""
        free = 1.0 - self.unified - self.pruned
        kinds = int(free > 1e-12) + int(self.unified > 0) + int(self.pruned > 0)
        code = math.ceil(math.log2(max(kinds, 1)))
        return 32.0 * free + self.unified + 32.0 * self.magnitudes + code * self.blocks


def kinds_of(kernel: np.ndarray, layout: BlockLayout) -> np.ndarray:
    """Each block's kind, read off the values: PRUNED if all its weights are zero,
    UNIFIED if two or more share one non-zero magnitude, FREE otherwise (a lone weight
    stores fewer bits as a float than as a magnitude and a sign)."""
    magnitudes = np.abs(layout.blocks(kernel).numpy())
    valid = layout.valid.numpy() > 0
    first = magnitudes[:, :1]
    same = np.all((magnitudes == first) | ~valid, axis=1)
    unified = same & (valid.sum(1) >= 2)
    return np.where(same & (first[:, 0] == 0), PRUNED, np.where(unified, UNIFIED, FREE))


@dataclasses.dataclass
class Encoding:
    """A kernel in the block format: what `tfhybrid.export.compact` writes.

    Attributes:
        layout: its `BlockLayout`.
        kinds: each block's kind.
        present: the kinds that occur, in order; a block's code is its kind's index here.
        code_bits: bits of each block's code (0 for one kind, 1 for two, 2 for three).
        sign_bits: the unified blocks' weights' signs (True: +), block by block.
        values: the unified blocks' magnitudes, then the free blocks' weights (float32).
    """

    layout: BlockLayout
    kinds: np.ndarray
    present: list
    code_bits: int
    sign_bits: np.ndarray
    values: np.ndarray

    @property
    def bits(self) -> int:
        """The storage counted: codes, sign bits and 32 per value."""
        return self.code_bits * len(self.kinds) + self.sign_bits.size + 32 * self.values.size


def encode(kernel: np.ndarray, block: tuple | str) -> Encoding:
    """`kernel` in the block format, its blocks' kinds read off the values (`kinds_of`)."""
    layout = BlockLayout(kernel.shape, block)
    kinds = kinds_of(kernel, layout)
    present = sorted(set(kinds.tolist()))
    cut, valid = layout.blocks(kernel).numpy(), layout.valid.numpy() > 0
    unified, free = kinds == UNIFIED, kinds == FREE
    return Encoding(
        layout=layout,
        kinds=kinds,
        present=present,
        code_bits=math.ceil(math.log2(len(present))) if len(present) > 1 else 0,
        sign_bits=(cut[unified] >= 0)[valid[unified]],
        values=np.concatenate([np.abs(cut[unified][:, 0]), cut[free][valid[free]]]),
    )


def in_blocks(layer, block: tuple | str) -> bool:
    """Whether `layer`'s kernel is one to cut into blocks of `block`: a Dense or Conv2D
    kernel, one with k x k positions for "kernel"."""
    return type(layer) in BLOCKED_LAYERS and not (
        block == "kernel" and type(layer) is keras.layers.Dense
    )
