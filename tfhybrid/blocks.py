"""Kernels cut into blocks: their layout, the kinds of block, and what they store.

Blocks lie in the plane of a kernel's input and output axes, at each kernel position:
`block=(rows, cols)` spans `rows` input channels and `cols` output channels (as
TF-MOT's `block_size` does for a Dense kernel); `block="kernel"` is one input-output
pair's whole k x k slice. A depthwise kernel (k, k, channels, multiplier) is cut as the
(k, k, 1, channels * multiplier) kernel it reshapes to (`blocked_shape`): a block spans
neighbouring output channels at one position, and "kernel" is one channel's slice.
Where the channels do not divide into blocks, the last block along an axis is shorter
(as if padded with zeros that are never stored).

A block is *free* (float32 weights), *unified* (one magnitude, each weight its own
sign) or *pruned* (all zero). A kernel's magnitudes are float32, or with
`magnitude_bits=b` below 32, whole multiples q * step of one float32 step per kernel,
q in 1..2**b (step = the largest magnitude / 2**b), each stored as q - 1 in b bits.
`tfhybrid.techniques.unify` trains kernels into this form; the cost model counts its
storage (`BlockShares`) and `tfhybrid.export.compact` writes it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfhybrid._keras import is_grouped, keras

#: The layers whose kernels are cut into blocks (exactly these classes).
BLOCKED_LAYERS = (keras.layers.Dense, keras.layers.Conv2D, keras.layers.DepthwiseConv2D)

FREE, UNIFIED, PRUNED = 0, 1, 2

#: Magnitudes stored as float32 (no step).
FLOAT_MAGNITUDES = 32


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
        magnitudes: unified blocks per entry (a magnitude each).
        magnitude_bits: bits of a magnitude (32: float32; fewer: on the kernel's step).
        step: the kernel's float32 step per entry (0 with float32 magnitudes).
    """

    blocks: float
    unified: float
    pruned: float
    magnitudes: float
    magnitude_bits: int = FLOAT_MAGNITUDES
    step: float = 0.0

    @classmethod
    def planned(
        cls,
        layout: BlockLayout,
        unify: float,
        prune: float,
        magnitude_bits: int = FLOAT_MAGNITUDES,
    ) -> BlockShares:
        """The shares for `unify` and `prune` of the blocks, blocks of average size."""
        per_entry = 1.0 / layout.weights_per_block
        step = _step_per_entry(unify > 0, magnitude_bits, math.prod(layout.shape))
        return cls(per_entry, unify, prune, unify * per_entry, magnitude_bits, step)

    @classmethod
    def measured(
        cls,
        layout: BlockLayout,
        kinds: np.ndarray,
        kept: np.ndarray | None = None,
        magnitude_bits: int = FLOAT_MAGNITUDES,
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
            magnitude_bits,
            _step_per_entry(bool(np.any(unified)), magnitude_bits, entries),
        )

    def bits_per_entry(self) -> float:
        """32 per free weight, a sign bit per unified one, `magnitude_bits` per magnitude
        (and the step), and each block's code (1 bit for two kinds, 2 for three, none for
        one)."""
        free = 1.0 - self.unified - self.pruned
        kinds = int(free > 1e-12) + int(self.unified > 0) + int(self.pruned > 0)
        code = math.ceil(math.log2(max(kinds, 1)))
        magnitudes = self.magnitude_bits * self.magnitudes + self.step
        return 32.0 * free + self.unified + magnitudes + code * self.blocks


def _step_per_entry(any_unified: bool, magnitude_bits: int, entries: float) -> float:
    """The bits per kernel entry of a kernel's float32 step (none for float magnitudes)."""
    return 32.0 / entries if any_unified and magnitude_bits < FLOAT_MAGNITUDES else 0.0


def quantized(magnitudes: tf.Tensor, magnitude_bits: int, among: tf.Tensor) -> tf.Tensor:
    """`magnitudes` on the grid q * step, q in 1..2**bits, step = the largest of them
    where `among` / 2**bits (exact: a power of two); as they are for 32 bits.

    The gradient passes straight through the rounding, so a magnitude keeps training.
    """
    if magnitude_bits >= FLOAT_MAGNITUDES:
        return magnitudes
    levels = 2.0**magnitude_bits
    largest = tf.reduce_max(tf.where(among, magnitudes, 0.0))
    step = tf.stop_gradient(tf.maximum(largest, 1e-30) / levels)
    on_grid = tf.clip_by_value(tf.round(magnitudes / step), 1.0, levels) * step
    # Exactly on the grid (m - m is 0), with the gradient of `magnitudes`.
    return tf.stop_gradient(on_grid) + (magnitudes - tf.stop_gradient(magnitudes))


def magnitude_grid(magnitudes: np.ndarray) -> tuple[int, float]:
    """(bits, step) of the fewest bits whose grid (see `quantized`) holds `magnitudes`
    exactly; (32, 0.0) if none of up to 16 bits does."""
    magnitudes = np.asarray(magnitudes, np.float32)
    if magnitudes.size and magnitudes.min() > 0:
        for bits in range(1, 17):
            step = np.float32(magnitudes.max() / np.float32(2.0**bits))
            on_grid = np.round(magnitudes / step).astype(np.float32) * step
            if np.array_equal(on_grid, magnitudes):
                return bits, float(step)
    return FLOAT_MAGNITUDES, 0.0


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
        magnitudes: the unified blocks' magnitudes (float32).
        magnitude_bits: bits per magnitude: 32 (float32) or fewer, on the grid of `step`.
        step: the magnitudes' step (0.0 for float32 magnitudes).
        free: the free blocks' weights (float32).
    """

    layout: BlockLayout
    kinds: np.ndarray
    present: list
    code_bits: int
    sign_bits: np.ndarray
    magnitudes: np.ndarray
    magnitude_bits: int
    step: float
    free: np.ndarray

    @property
    def magnitude_codes(self) -> np.ndarray:
        """Each magnitude's q - 1 on the grid (see the module); empty for float32 ones."""
        if self.magnitude_bits >= FLOAT_MAGNITUDES:
            return np.zeros(0, np.int64)
        return np.round(self.magnitudes / np.float32(self.step)).astype(np.int64) - 1

    @property
    def bits(self) -> int:
        """The storage counted: codes, sign bits, magnitudes (and the step), 32 per free
        weight."""
        magnitudes = self.magnitude_bits * self.magnitudes.size
        magnitudes += 32 if self.magnitude_bits < FLOAT_MAGNITUDES else 0  # the step
        signs = self.sign_bits.size
        return self.code_bits * len(self.kinds) + signs + magnitudes + 32 * self.free.size


def encode(kernel: np.ndarray, block: tuple | str) -> Encoding:
    """`kernel` in the block format, its blocks' kinds read off the values (`kinds_of`)
    and its magnitudes on the grid of fewest bits that holds them (`magnitude_grid`)."""
    layout = BlockLayout(kernel.shape, block)
    kinds = kinds_of(kernel, layout)
    present = sorted(set(kinds.tolist()))
    cut, valid = layout.blocks(kernel).numpy(), layout.valid.numpy() > 0
    unified, free = kinds == UNIFIED, kinds == FREE
    magnitudes = np.abs(cut[unified][:, 0]).astype(np.float32)
    magnitude_bits, step = magnitude_grid(magnitudes)
    return Encoding(
        layout=layout,
        kinds=kinds,
        present=present,
        code_bits=math.ceil(math.log2(len(present))) if len(present) > 1 else 0,
        sign_bits=(cut[unified] >= 0)[valid[unified]],
        magnitudes=magnitudes,
        magnitude_bits=magnitude_bits,
        step=step,
        free=cut[free][valid[free]].astype(np.float32),
    )


def in_blocks(layer, block: tuple | str) -> bool:
    """Whether `layer`'s kernel is one to cut into blocks of `block`: a Dense, Conv2D or
    DepthwiseConv2D kernel (not a grouped one), one with k x k positions for "kernel"."""
    if type(layer) not in BLOCKED_LAYERS or is_grouped(layer):
        return False
    return not (block == "kernel" and type(layer) is keras.layers.Dense)


def kernel_of(layer) -> tf.Variable:
    """The weight a blocked layer's blocks cut: its kernel, or its depthwise kernel."""
    return layer.depthwise_kernel if type(layer) is keras.layers.DepthwiseConv2D else layer.kernel


def blocked_shape(layer) -> tuple:
    """The shape the blocks of `layer`'s kernel are laid over (see the module)."""
    shape = tuple(int(d) for d in kernel_of(layer).shape)
    if type(layer) is keras.layers.DepthwiseConv2D:
        *spatial, channels, multiplier = shape
        return (*spatial, 1, channels * multiplier)
    return shape
