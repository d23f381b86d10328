"""A compact weight file in exactly the storage the budget counts, and its loader.

`save_compact(model, path, block)` writes a plain Keras model: a header (the model's
architecture and, per weight tensor, how it is stored) and a payload. Each tensor is
stored in the cheapest encoding that holds it exactly, the one `th.profile` counts
(`cost.plain_encoding`):

- "float32": 32 bits per value;
- "sparse": a one-bit-per-entry bitmap of the non-zeros, then the non-zeros (float32);
- "table": for at most 256 distinct values, an index of ceil(log2 k) bits per entry,
  then the k values (float32): a quantized kernel (`th.LC`'s `Quantize`, `Binarize`,
  `Ternarize`, `th.Cluster` after `strip`);
- "blocks", for a Dense, Conv2D or DepthwiseConv2D kernel cut into blocks of `block`
  (`tfhybrid.blocks`) where that is cheaper still: one bit stream and one float32 array,
  - per block a code saying its kind (0 bits when all blocks are of one kind, 1 for
    two kinds, 2 for three);
  - per unified block one sign bit per weight, and its magnitude: float32, or, where the
    kernel's magnitudes lie on a grid of one step (`blocks.magnitude_grid`, as
    `th.Unify(magnitude_bits=...)` trains them), a code of that many bits in the bit
    stream and the step once in the float32 array;
  - per free block its weights (float32); pruned blocks store nothing.

The payload's size is `th.profile(model, block=block).bits` rounded up to whole bytes
once per tensor; `load_compact` restores the same model, weight for weight. The kinds are
read off the values, so any model whose tensors are in such a form writes compactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
from typing import Any

import numpy as np

from tfhybrid import blocks
from tfhybrid._keras import keras
from tfhybrid.cost import plain_encoding, table_index_bits
from tfhybrid.training.model import refuse_search_model

MAGIC = b"THC1"


@dataclasses.dataclass
class CompactReport:
    """What `save_compact` wrote.

    Attributes:
        path: the file.
        size_bytes: the whole file (header included).
        payload_bytes: the weights alone.
        counted_bits: the weights' storage as counted (`th.profile(model, block).bits`).
        float32_bits: the same weights at 32 bits each.
        kernels: per kernel stored in blocks, its counts {"free", "unified", "pruned"}.
        encodings: per tensor ("<layer>/<index>"), its encoding ("float32", "sparse",
            "table" or "blocks").
    """

    path: str
    size_bytes: int
    payload_bytes: int
    counted_bits: int
    float32_bits: int
    kernels: dict
    encodings: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        share = self.counted_bits / self.float32_bits
        return (
            f"{self.path}: {self.size_bytes:,} bytes ({self.payload_bytes:,} of weights); "
            f"counted {self.counted_bits:,} bits = {share:.4f} of float32"
        )


def save_compact(model: Any, path: str, block: tuple | str | None = (1, 4)) -> CompactReport:
    """Writes `model`'s weights, each tensor in its cheapest exact encoding (see the module).

    Args:
        model: a plain Keras model (e.g. `strip` of a model compressed with `th.Unify`
            or `th.LC`).
        path: the file to write.
        block: the blocks kernels may be cut into (`th.Unify`'s `block`); None for none.

    Returns:
        A `CompactReport` with the file's and the counted sizes.

    Raises:
        ValueError: for a search model (strip it first).
    """
    refuse_search_model(model, "save_compact")
    entries, payload, kernels = [], bytearray(), {}
    counted = 0
    for layer in model.layers:
        for index, weight in enumerate(layer.get_weights()):
            entry = {"layer": layer.name, "index": index, "shape": list(weight.shape)}
            entry["encoding"], bits = plain_encoding(weight)
            coded = None
            if block is not None and index == 0 and blocks.in_blocks(layer, block):
                coded = _encoded(weight.reshape(blocks.blocked_shape(layer)), block, bits)
            if coded is None:
                data = ENCODERS[entry["encoding"]](weight, entry)
            else:
                data, bits, entry["blocks"] = coded
                entry["encoding"] = "blocks"
                kernels[layer.name] = entry["blocks"]["counts"]
            entry["bytes"] = len(data)
            entries.append(entry)
            payload += data
            counted += bits
    header = json.dumps({"model": json.loads(model.to_json()), "weights": entries}).encode()
    content = MAGIC + struct.pack("<I", len(header)) + header + bytes(payload)
    pathlib.Path(path).write_bytes(content)
    float32 = 32 * sum(w.size for w in model.get_weights())
    encodings = {f"{e['layer']}/{e['index']}": e["encoding"] for e in entries}
    return CompactReport(
        str(path), len(content), len(payload), counted, float32, kernels, encodings
    )


def load_compact(path: str, custom_objects: dict | None = None) -> Any:
    """The Keras model that `save_compact` wrote to `path`, with the same weights.

    Raises:
        ValueError: if `path` is not a file `save_compact` wrote.
    """
    content = pathlib.Path(path).read_bytes()
    if content[:4] != MAGIC:
        raise ValueError(f"{path} is not a tfhybrid compact weight file (no {MAGIC!r} header).")
    (length,) = struct.unpack("<I", content[4:8])
    header = json.loads(content[8 : 8 + length])
    model = keras.models.model_from_json(json.dumps(header["model"]), custom_objects)
    offset, weights = 8 + length, {}
    for entry in header["weights"]:
        data = content[offset : offset + entry["bytes"]]
        offset += entry["bytes"]
        shape = tuple(entry["shape"])
        if "blocks" in entry:
            value = _decoded(data, entry["blocks"]).reshape(shape)
        else:
            value = DECODERS[entry.get("encoding", "float32")](data, entry, math.prod(shape))
        weights[entry["layer"], entry["index"]] = value.reshape(shape)
    for layer in model.layers:
        count = len(layer.weights)
        if count:
            layer.set_weights([weights[layer.name, i] for i in range(count)])
    return model


def _float32(values: np.ndarray) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def _sparse(weight: np.ndarray, entry: dict) -> bytes:
    """A bitmap of the non-zeros (little-endian bits), then the non-zeros."""
    flat = weight.ravel()
    bitmap = np.packbits(flat != 0, bitorder="little").tobytes()
    entry["bit_bytes"] = len(bitmap)
    return bitmap + _float32(flat[flat != 0])


def _table(weight: np.ndarray, entry: dict) -> bytes:
    """Each entry's index into the distinct values (`cost.table_index_bits` each, packed
    least significant bit first), then the distinct values."""
    values, indices = np.unique(weight.ravel(), return_inverse=True)
    stream = np.packbits(_bits_of(indices, table_index_bits(values.size)), bitorder="little")
    entry["bit_bytes"], entry["values"] = len(stream), int(values.size)
    return stream.tobytes() + _float32(values)


def _unpacked(data: bytes, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the bit stream, the float32 values) of a tensor stored as bits then floats."""
    stream = np.unpackbits(np.frombuffer(data[: entry["bit_bytes"]], np.uint8), bitorder="little")
    return stream.astype(bool), np.frombuffer(data[entry["bit_bytes"] :], "<f4")


def _from_sparse(data: bytes, entry: dict, size: int) -> np.ndarray:
    bitmap, nonzero = _unpacked(data, entry)
    value = np.zeros(size, np.float32)
    value[bitmap[:size]] = nonzero
    return value


def _from_table(data: bytes, entry: dict, size: int) -> np.ndarray:
    stream, values = _unpacked(data, entry)
    return values[_codes_of(stream, size, table_index_bits(entry["values"]))]


ENCODERS = {"float32": lambda w, _: _float32(w), "sparse": _sparse, "table": _table}
DECODERS = {
    "float32": lambda data, _, size: np.frombuffer(data, "<f4"),
    "sparse": _from_sparse,
    "table": _from_table,
}


def _encoded(kernel: np.ndarray, block: tuple | str, plain_bits: int) -> tuple | None:
    """(bytes, counted bits, description) of `kernel` in blocks; None where its plain
    encoding (`plain_bits`) is as small."""
    encoding = blocks.encode(kernel, block)
    if encoding.bits >= plain_bits:
        return None
    codes = np.searchsorted(encoding.present, encoding.kinds)
    streams = [
        _bits_of(codes, encoding.code_bits),
        encoding.sign_bits,
        _bits_of(encoding.magnitude_codes, encoding.magnitude_bits),
    ]
    stream = np.packbits(np.concatenate(streams), bitorder="little")
    quantized = encoding.magnitude_bits < blocks.FLOAT_MAGNITUDES
    floats = [[encoding.step]] if quantized else [encoding.magnitudes]
    data = stream.tobytes() + np.concatenate([*floats, encoding.free]).astype("<f4").tobytes()
    names = (("free", blocks.FREE), ("unified", blocks.UNIFIED), ("pruned", blocks.PRUNED))
    description = {
        "block": block if block == "kernel" else list(block),
        "blocked_shape": list(kernel.shape),
        "kinds": encoding.present,
        "magnitude_bits": encoding.magnitude_bits,
        "bit_bytes": len(stream),
        "counts": {name: int(np.sum(encoding.kinds == kind)) for name, kind in names},
    }
    return data, encoding.bits, description


def _bits_of(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each code's low `bits` bits, least significant first, one code after another."""
    if bits >= blocks.FLOAT_MAGNITUDES:
        return np.zeros(0, bool)
    return ((np.asarray(codes)[:, None] >> np.arange(bits)) & 1).astype(bool).ravel()


def _codes_of(stream: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The first `count` codes of `bits` bits in `stream` (the inverse of `_bits_of`)."""
    return stream[: count * bits].reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits))


def _decoded(data: bytes, description: dict) -> np.ndarray:
    """The kernel `_encoded` wrote, in its blocks' shape."""
    block = description["block"]
    shape = tuple(description["blocked_shape"])
    layout = blocks.BlockLayout(shape, block if block == "kernel" else tuple(block))
    present = description["kinds"]
    code_bits = math.ceil(math.log2(len(present))) if len(present) > 1 else 0
    magnitude_bits = description.get("magnitude_bits", blocks.FLOAT_MAGNITUDES)
    stream, values = _unpacked(data, description)
    count = layout.count
    codes = _codes_of(stream, count, code_bits)
    kinds = np.asarray(present)[codes] if code_bits else np.full(count, present[0])
    stream = stream[code_bits * count :]
    valid = layout.valid.numpy() > 0
    unified, free = kinds == blocks.UNIFIED, kinds == blocks.FREE
    signed = int(valid[unified].sum())
    signs, stream = np.where(stream[:signed], 1.0, -1.0).astype(np.float32), stream[signed:]
    if magnitude_bits < blocks.FLOAT_MAGNITUDES:
        step, values = values[0], values[1:]
        grid = _codes_of(stream, int(unified.sum()), magnitude_bits) + 1
        magnitudes = grid.astype(np.float32) * step
    else:
        magnitudes, values = values[: int(unified.sum())], values[int(unified.sum()) :]
    cut = np.zeros((count, layout.size), np.float32)
    unified_blocks = np.zeros((int(unified.sum()), layout.size), np.float32)
    unified_blocks[valid[unified]] = signs
    cut[unified] = unified_blocks * magnitudes[:, None]
    free_blocks = np.zeros((int(free.sum()), layout.size), np.float32)
    free_blocks[valid[free]] = values
    cut[free] = free_blocks
    return layout.kernel(cut).numpy()
