"""Will a `.tflite` model run on the Edge TPU? `check_edgetpu` lists what stops it.

The rules are Coral's model requirements (coral.ai/docs/edgetpu/models-intro):
every tensor 8-bit quantized (int32 only for constant biases and shapes), static
shapes, at most 3 dimensions larger than 1 and only the innermost ones, and only
the operators on Coral's supported list. The compiler maps ops in execution order
until the first it cannot run; that op and all after it fall back to the CPU.

Op versions: the Edge TPU compiler (v16) parses op versions that TFLite's runtime
knew up to about TF 2.5; newer versions fail with "Didn't find op for builtin
opcode ... version N". The maximum versions below are those of TFLite's
`runtime_version.cc` for runtime 2.5. When `edgetpu_compiler` is on PATH its log
is included and is the final word.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
import tempfile

from tfhybrid.export import flatbuffer

#: Coral's supported operators, with the newest op version the compiler parses.
SUPPORTED_OPS = {
    "ADD": 3,
    "AVERAGE_POOL_2D": 3,
    "CONCATENATION": 3,
    "CONV_2D": 5,
    "DEPTHWISE_CONV_2D": 6,
    "DEQUANTIZE": 4,
    "EXPAND_DIMS": 1,
    "FULLY_CONNECTED": 9,
    "L2_NORMALIZATION": 2,
    "LOGISTIC": 3,
    "LSTM": 4,
    "MAXIMUM": 4,
    "MAX_POOL_2D": 3,
    "MEAN": 3,
    "MINIMUM": 4,
    "MUL": 4,
    "PACK": 3,
    "PAD": 3,
    "PRELU": 1,
    "QUANTIZE": 2,
    "REDUCE_MAX": 3,
    "REDUCE_MIN": 3,
    "RELU": 3,
    "RELU6": 3,
    "RELU_N1_TO_1": 1,
    "RESHAPE": 1,
    "RESIZE_BILINEAR": 4,
    "RESIZE_NEAREST_NEIGHBOR": 4,
    "RSQRT": 2,
    "SLICE": 5,
    "SOFTMAX": 3,
    "SPACE_TO_DEPTH": 2,
    "SPLIT": 4,
    "SQUARED_DIFFERENCE": 2,
    "SQUEEZE": 2,
    "STRIDED_SLICE": 5,
    "SUB": 5,
    "SUM": 2,
    "TANH": 3,
    "TRANSPOSE": 5,
    "TRANSPOSE_CONV": 3,
}
EIGHT_BIT = ("INT8", "UINT8")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing that keeps (part of) the model off the Edge TPU.

    Attributes:
        kind: "float_io", "dtype", "dynamic_shape", "rank", "unsupported_op" or
            "op_version".
        detail: what is wrong and what to do.
        op: index of the operator concerned (None for model-level findings).
    """

    kind: str
    detail: str
    op: int | None = None


@dataclasses.dataclass
class EdgeTPUReport:
    """The result of `check_edgetpu`.

    Attributes:
        path: the checked `.tflite` file.
        findings: everything that keeps ops off the Edge TPU (empty: all map).
        ops_total: operators in the model.
        first_cpu_op: "index NAME" of the first op the compiler cannot map: it and
            every op after it run on the CPU (None if all map).
        ops_on_edgetpu: ops before that one.
        compiler_log: `edgetpu_compiler`'s output, when it is installed.
    """

    path: str
    findings: list[Finding]
    ops_total: int
    first_cpu_op: str | None
    ops_on_edgetpu: int
    compiler_log: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing keeps any op off the Edge TPU."""
        return not self.findings

    def kinds(self) -> set[str]:
        """The kinds of the findings (see `Finding.kind`)."""
        return {f.kind for f in self.findings}

    def __str__(self) -> str:
        head = (
            f"Edge TPU: all {self.ops_total} ops map"
            if self.ok
            else f"Edge TPU: {self.ops_on_edgetpu} of {self.ops_total} ops map; from op "
            f"{self.first_cpu_op} on, the rest runs on the CPU"
        )
        lines = [head, *(f"  [{f.kind}] {f.detail}" for f in self.findings)]
        if self.compiler_log is not None:
            lines.append("  edgetpu_compiler:\n    " + self.compiler_log.replace("\n", "\n    "))
        return "\n".join(lines)


def check_edgetpu(tflite_path: str | pathlib.Path) -> EdgeTPUReport:
    """Lists everything in a `.tflite` file that would keep ops off the Edge TPU.

    Args:
        tflite_path: the model file.

    Returns:
        An `EdgeTPUReport`; `report.ok` is True when every op can map.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a `.tflite` file.
    """
    path = pathlib.Path(tflite_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file.")
    graph = flatbuffer.read(path)
    findings = _io_findings(graph)
    first_cpu = None
    for op in graph.operators:
        found = _op_findings(graph, op)
        findings += found
        if found and first_cpu is None:
            first_cpu = op
    if graph.subgraphs > 1:
        findings.append(
            Finding("unsupported_op", f"{graph.subgraphs} subgraphs (control flow): not mapped.")
        )
    return EdgeTPUReport(
        path=str(path),
        findings=findings,
        ops_total=len(graph.operators),
        first_cpu_op=None if first_cpu is None else f"{first_cpu.index} {first_cpu.name}",
        ops_on_edgetpu=len(graph.operators) if first_cpu is None else first_cpu.index,
        compiler_log=_compile(path),
    )


def _io_findings(graph: flatbuffer.Graph) -> list[Finding]:
    findings = []
    for role, indices in (("input", graph.inputs), ("output", graph.outputs)):
        for index in indices:
            tensor = graph.tensors[index]
            if tensor.dtype not in EIGHT_BIT:
                findings.append(
                    Finding(
                        "float_io",
                        f"model {role} '{tensor.name}' is {tensor.dtype}: the compiler "
                        "refuses it ('Model not quantized'). Export with quantize='int8' "
                        "(integer inputs and outputs), e.g. target='edgetpu'.",
                    )
                )
    return findings


def _op_findings(graph: flatbuffer.Graph, op: flatbuffer.Operator) -> list[Finding]:
    where = f"op {op.index} {op.name}"
    found = []
    if op.name not in SUPPORTED_OPS:
        found.append(
            Finding("unsupported_op", f"{where} is not on Coral's supported list.", op.index)
        )
    elif op.version > SUPPORTED_OPS[op.name]:
        found.append(
            Finding(
                "op_version",
                f"{where} is version {op.version}; the compiler parses up to "
                f"{SUPPORTED_OPS[op.name]}.",
                op.index,
            )
        )
    problems: dict[str, list[str]] = {}
    for index in (*op.inputs, *op.outputs):
        if index >= 0:
            for kind, text in _tensor_problems(graph.tensors[index]):
                problems.setdefault(kind, []).append(text)
    found += [
        Finding(kind, f"{where}: {'; '.join(texts)}{_ADVICE[kind]}", op.index)
        for kind, texts in problems.items()
    ]
    return found


_ADVICE = {
    "dtype": ". Export with quantize='int8' (or target='edgetpu').",
    "dynamic_shape": ". Export with a fixed batch size (batch_size=1).",
    "rank": ". Only the 3 innermost dimensions may be larger than 1.",
}


def _tensor_problems(tensor: flatbuffer.Tensor) -> list[tuple[str, str]]:
    """(kind, description) of what is wrong with one tensor of an op."""
    name = f"'{tensor.name}'"
    problems = []
    if tensor.dtype not in EIGHT_BIT and not (tensor.dtype == "INT32" and tensor.constant):
        problems.append(("dtype", f"{name} is {tensor.dtype}"))
    if any(d < 0 for d in tensor.shape_signature):
        problems.append(("dynamic_shape", f"{name} has shape {list(tensor.shape_signature)}"))
    if not tensor.constant and any(d > 1 for d in tensor.shape[:-3]):
        problems.append(("rank", f"{name} has shape {list(tensor.shape)}"))
    return problems


def _compile(path: pathlib.Path) -> str | None:
    """`edgetpu_compiler`'s log for the file, or None when it is not installed."""
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [compiler, "-s", "-o", out, str(path)], capture_output=True, text=True, timeout=600
        )
    return (done.stdout + done.stderr).strip()
