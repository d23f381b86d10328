"""Kernels cut into blocks: their layout, the kinds of block, and what they store.

Blocks lie in the plane of a kernel's input and output axes, at each kernel position:
`block=(rows, cols)` spans `rows` input channels and `cols` output channels (as
TF-MOT's `block_size` does for a Dense kernel); `block="kernel"` is one input-output
pair's whole k x k slice. Where the channels do not divide into blocks, the last block
along an axis is shorter (as if padded with zeros that are never stored).

A block is *free* (float32 weights), *unified* (one magnitude, each weight its own
sign) or *pruned* (all zero). `tfhybrid.techniques.unify` trains kernels into this
form; the cost model counts its storage (`block_bits`) and `tfhybrid.export.compact`
writes it.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

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


def block_bits(n: int, unified: float, pruned: float) -> float:
    """Bits per kernel entry of a kernel in blocks of `n` weights (see `CostModel.costs`):
    32 for a free weight, a sign bit and a 32nd of the magnitude for a unified one,
    nothing for a pruned one, and each block's code (which kind it is) shared out."""
    kinds = (unified + pruned < 1) + (unified > 0) + (pruned > 0)
    code = math.ceil(math.log2(max(kinds, 1)))
    return 32.0 * (1.0 - unified - pruned) + unified * (1.0 + 32.0 / n) + code / n


def kinds_of(kernel: np.ndarray, layout: BlockLayout) -> np.ndarray:
    """Each block's kind, read off the values: PRUNED if all its weights are zero,
    UNIFIED if they share one non-zero magnitude, FREE otherwise."""
    magnitudes = np.abs(layout.blocks(kernel).numpy())
    valid = layout.valid.numpy() > 0
    first = magnitudes[:, :1]
    same = np.all((magnitudes == first) | ~valid, axis=1)
    return np.where(same & (first[:, 0] == 0), PRUNED, np.where(same, UNIFIED, FREE))
