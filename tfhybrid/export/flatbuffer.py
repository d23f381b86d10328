"""Read a `.tflite` file's main graph: operators (with versions) and tensors; cut
one operator out as a model of its own.

Both the export report (op counts, I/O dtypes) and the Edge TPU check read the
model this way, from LiteRT's own flatbuffer schema, so they see exactly what a
runtime or the Edge TPU compiler sees, op versions included. The per-op profile
times each operator as its own one-op model (`single_op_model`).
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items() if name.isupper()}
_TYPE_NAMES = {code: name for name, code in vars(schema.TensorType).items() if name.isupper()}
_NUMPY_TYPES = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
}
#: The operators `resized_op_model` can give other channel counts.
RESIZABLE = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor of the graph: `dtype` as the schema names it (e.g. "INT8")."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: The shape with -1 where a dimension is dynamic.
    shape_signature: tuple[int, ...]
    constant: bool


@dataclasses.dataclass(frozen=True)
class Operator:
    """An operator of the graph: builtin name (e.g. "CONV_2D") or "CUSTOM:<code>"."""

    index: int
    name: str
    version: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Graph:
    """The main subgraph of a `.tflite` model, in execution order."""

    operators: list[Operator]
    tensors: list[Tensor]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    subgraphs: int


def read(model: str | pathlib.Path | bytes) -> Graph:
    """Parses a `.tflite` file (path or bytes) into its main `Graph`.

    Raises:
        ValueError: if the bytes are not a TFLite flatbuffer.
    """
    data = model if isinstance(model, bytes) else pathlib.Path(model).read_bytes()
    parsed = _parsed(data, "data" if isinstance(model, bytes) else str(model))
    main = parsed.subgraphs[0]
    tensors = [
        Tensor(
            index=i,
            name=_text(t.name),
            dtype=_TYPE_NAMES.get(t.type, str(t.type)),
            shape=tuple(int(d) for d in _seq(t.shape)),
            shape_signature=tuple(int(d) for d in _seq(t.shapeSignature) or _seq(t.shape)),
            constant=_has_data(parsed, t.buffer),
        )
        for i, t in enumerate(main.tensors)
    ]
    operators = [
        Operator(
            index=i,
            name=_op_name(parsed.operatorCodes[op.opcodeIndex]),
            version=int(parsed.operatorCodes[op.opcodeIndex].version),
            inputs=tuple(int(t) for t in _seq(op.inputs)),
            outputs=tuple(int(t) for t in _seq(op.outputs)),
        )
        for i, op in enumerate(main.operators or [])
    ]
    return Graph(
        operators,
        tensors,
        tuple(int(t) for t in _seq(main.inputs)),
        tuple(int(t) for t in _seq(main.outputs)),
        len(parsed.subgraphs),
    )


def single_op_model(model: bytes, index: int) -> bytes:
    """The `.tflite` bytes of a model that runs only operator `index` of `model`'s main graph.

    The operator keeps its options, constant inputs (weights, biases, quantization) and
    tensor types; its other inputs become the model's inputs and its outputs the model's
    outputs. Only the buffers it reads are kept, so the file is small.

    Args:
        model: the bytes of a `.tflite` file with one subgraph (control flow is refused).
        index: the operator's position in the main graph's execution order.

    Returns:
        The one-operator model's bytes.

    Raises:
        ValueError: if `model` is not a `.tflite` file, has several subgraphs, or has no
            operator `index`.
    """
    parsed = _parsed(model, "single_op_model: the data")
    if len(parsed.subgraphs) != 1:
        raise ValueError(
            f"single_op_model: the model has {len(parsed.subgraphs)} subgraphs (control flow); "
            "only single-graph models can be cut into operators."
        )
    main = parsed.subgraphs[0]
    operators = main.operators or []
    if not 0 <= index < len(operators):
        raise ValueError(
            f"single_op_model: operator index {index} is out of range; the model has "
            f"{len(operators)} operators."
        )
    op = copy.deepcopy(operators[index])
    used = sorted({int(t) for t in [*_seq(op.inputs), *_seq(op.outputs)] if t >= 0})
    renumbered = {old: new for new, old in enumerate(used)}
    buffers, tensors, constants = [schema.BufferT()], [], set()
    for old in used:
        tensor = copy.deepcopy(main.tensors[old])
        if _has_data(parsed, tensor.buffer):
            constants.add(renumbered[old])
            buffers.append(copy.deepcopy(parsed.buffers[tensor.buffer]))
        else:
            buffers.append(schema.BufferT())
        tensor.buffer = len(buffers) - 1
        tensors.append(tensor)
    op.inputs = [renumbered.get(int(t), -1) for t in _seq(op.inputs)]
    op.outputs = [renumbered[int(t)] for t in _seq(op.outputs)]
    graph = schema.SubGraphT()
    graph.tensors = tensors
    graph.operators = [op]
    graph.inputs = [t for t in op.inputs if t >= 0 and t not in constants]
    graph.outputs = list(op.outputs)
    graph.name = main.name
    cut = schema.ModelT()
    cut.version = parsed.version
    cut.operatorCodes = parsed.operatorCodes
    cut.subgraphs = [graph]
    cut.buffers = buffers
    cut.description = parsed.description
    builder = flatbuffers.Builder(1024)
    builder.Finish(cut.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def resized_op_model(
    model: bytes, index: int, inputs: int, outputs: int, pointwise: bool = False
) -> bytes:
    """Operator `index` as a model of its own (`single_op_model`) with other channel counts.

    The operator keeps its kind, options, kernel size, positions, types and quantization
    scheme; its weights and per-channel quantization parameters are the original ones
    repeated or cut to the new shape (a latency does not depend on their values).

    Args:
        model: the bytes of a `.tflite` file with one subgraph.
        index: a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED operator of its main graph.
        inputs: its input channels in the new model.
        outputs: its output channels (a depthwise convolution's follow its inputs).
        pointwise: a CONV_2D becomes a 1 x 1, stride-1 convolution at its output's
            positions (the second factor of a convolution split by rank).

    Returns:
        The one-operator model's bytes.

    Raises:
        ValueError: as `single_op_model`, or for an operator of another kind.
    """
    cut = _parsed(single_op_model(model, index), "resized_op_model: the data")
    graph, op = cut.subgraphs[0], cut.subgraphs[0].operators[0]
    name = _op_name(cut.operatorCodes[op.opcodeIndex])
    if name not in RESIZABLE:
        raise ValueError(f"resized_op_model: operator {index} is {name}, not one of {RESIZABLE}.")
    tensors = graph.tensors
    activation, weights, output = (tensors[t] for t in (op.inputs[0], op.inputs[1], op.outputs[0]))
    in_shape, out_shape = list(activation.shape), list(output.shape)
    if name == "DEPTHWISE_CONV_2D":
        outputs = inputs * (int(weights.shape[-1]) // int(in_shape[-1]))
        kernel = [1, *weights.shape[1:3], outputs]
    elif name == "FULLY_CONNECTED":
        kernel = [outputs, inputs]
    else:
        area = [1, 1] if pointwise else list(weights.shape[1:3])
        kernel = [outputs, *area, inputs]
        if pointwise:
            in_shape[1:-1] = out_shape[1:-1]
            options = op.builtinOptions
            options.strideH = options.strideW = options.dilationHFactor = 1
            options.dilationWFactor = 1
    _reshape(cut, activation, [*in_shape[:-1], inputs])
    _reshape(cut, weights, kernel)
    _reshape(cut, output, [*out_shape[:-1], outputs])
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        _reshape(cut, tensors[op.inputs[2]], [outputs])
    builder = flatbuffers.Builder(1024)
    builder.Finish(cut.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _reshape(model, tensor, shape: list) -> None:
    """Gives `tensor` a new shape; a constant's values and a per-channel quantization's
    parameters are repeated or cut to fit it."""
    tensor.shape = np.array(shape, np.int32)
    if tensor.shapeSignature is not None:
        tensor.shapeSignature = np.array(shape, np.int32)
    quantization = tensor.quantization
    if quantization is not None and quantization.scale is not None and len(quantization.scale) > 1:
        channels = shape[quantization.quantizedDimension]
        quantization.scale = np.resize(np.asarray(quantization.scale), channels)
        if quantization.zeroPoint is not None:
            quantization.zeroPoint = np.resize(np.asarray(quantization.zeroPoint), channels)
    buffer = model.buffers[tensor.buffer]
    if buffer.data is not None and len(buffer.data):
        dtype = _NUMPY_TYPES[_TYPE_NAMES[tensor.type]]
        values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype)
        resized = np.resize(values, int(np.prod(shape))).astype(dtype)
        buffer.data = np.frombuffer(resized.tobytes(), np.uint8)


def _parsed(data: bytes, what: str):
    """The flatbuffer's object tree; `what` names the data in the error."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{what} is not a .tflite file.")
    return schema.ModelT.InitFromPackedBuf(data, 0)


def _op_name(code) -> str:
    # Codes above 127 live in `builtinCode`; older files only fill the deprecated byte.
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    if builtin == schema.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{_text(code.customCode)}"
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def _has_data(parsed, buffer: int) -> bool:
    if not buffer or buffer >= len(parsed.buffers):
        return False
    entry = parsed.buffers[buffer]
    return entry.data is not None and len(entry.data) > 0 or bool(getattr(entry, "size", 0))


def _seq(values) -> list:
    return [] if values is None else list(values)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
