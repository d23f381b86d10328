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
from ai_edge_litert import schema_py_generated as schema

_OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items() if name.isupper()}
_TYPE_NAMES = {code: name for name, code in vars(schema.TensorType).items() if name.isupper()}


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
