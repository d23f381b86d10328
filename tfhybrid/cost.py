"""Multiply-accumulates (MACs) and parameters per layer, from shapes alone.

MACs are those of one forward pass for batch size 1, counted for the layers that
multiply by weights (Conv, DepthwiseConv, SeparableConv, ConvTranspose, Dense), the
convention behind figures such as "MobileNetV2: 300M MACs". Element-wise layers
(BatchNorm, activations, Add, pooling) count 0 MACs; their parameters count.

Every formula has the form `MACs = m0 + a * cin + b * cin * cout + c * cout`, with
`cin`/`cout` the layer's input/output channel counts, so the same terms serve exact counts
(ints) and a differentiable budget (soft channel counts as tensors).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid import graph
from tfhybrid import latency as latency_lib
from tfhybrid._keras import (
    CONV,
    DEPTHWISE_CONV,
    SEPARABLE_CONV,
    TRANSPOSED_CONV,
    is_factorable,
    is_grouped,
    keras,
)
from tfhybrid.blocks import blocked_shape, in_blocks, kernel_of
from tfhybrid.blocks import encode as encode_blocks

L = keras.layers


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cost of one layer call.

    Attributes:
        name: layer name.
        type: layer class name.
        output_shape: output shape without the batch axis.
        macs: multiply-accumulates of this call, batch size 1.
        params: parameters of the layer (counted at its first call only).
    """

    name: str
    type: str
    output_shape: tuple
    macs: int
    params: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """MACs, parameters and storage of a model, in total and per layer call.

    Attributes:
        macs: total multiply-accumulates of one forward pass, batch size 1.
        params: total parameters (trainable and not), as `model.count_params()`.
        layers: one `LayerCost` per layer call, in topological order.
        nonzero_params: the parameters that are not exactly zero (what a params
            budget counts).
        bits: storage of the weights: per weight tensor the cheapest of 32 bits per
            value; 32 bits per non-zero and a one-bit-per-entry bitmap; or, for a
            tensor of at most 256 distinct values, an index of ceil(log2(distinct))
            bits per entry and the distinct values at 32 bits each.
        multiplies: the multiplies of one forward pass where a kernel in blocks
            multiplies once per unified block and skips its pruned ones (`profile`'s
            `block`); what hardware with such a kernel would do, not LiteRT (which
            runs `macs`). Equal to `macs` without `block`.
    """

    macs: int
    params: int
    layers: list[LayerCost]
    nonzero_params: int = 0
    bits: int = 0
    multiplies: int = 0

    def ratios(self, original: Profile) -> dict[str, float]:
        """{"macs", "params", "bits"} of this model over `original`'s, as a budget counts
        them: this model's non-zero parameters and its storage over all of the
        original's parameters and their float32 storage."""
        return {
            "macs": self.macs / original.macs,
            "params": self.nonzero_params / original.params,
            "bits": self.bits / (32 * original.params),
        }

    def layer(self, name: str) -> LayerCost:
        """The cost of the (first call of the) layer called `name`."""
        for cost in self.layers:
            if cost.name == name:
                return cost
        raise KeyError(f"No layer named '{name}' in this profile.")


def mac_terms(layer: Any, in_shape: tuple, out_shape: tuple) -> tuple[Fraction, ...]:
    """The terms (m0, a, b, c) of `MACs = m0 + a*cin + b*cin*cout + c*cout` for one call.

    Args:
        layer: the layer.
        in_shape: its input shape, batch axis first.
        out_shape: its output shape, batch axis first.

    Returns:
        (m0, a, b, c), all zero for layers that do not multiply by weights.
    """
    zero = Fraction(0)
    out_positions = math.prod(out_shape[1:-1])
    if isinstance(layer, DEPTHWISE_CONV):
        area = math.prod(layer.kernel_size)
        return zero, Fraction(out_positions * area * layer.depth_multiplier), zero, zero
    if isinstance(layer, SEPARABLE_CONV):
        area, mult = math.prod(layer.kernel_size), layer.depth_multiplier
        return zero, Fraction(out_positions * area * mult), Fraction(out_positions * mult), zero
    if isinstance(layer, TRANSPOSED_CONV):
        in_positions = math.prod(in_shape[1:-1])
        return zero, zero, Fraction(in_positions * math.prod(layer.kernel_size)), zero
    if is_grouped(layer):  # groups go whole: each input channel meets filters/groups outputs
        area = math.prod(layer.kernel_size)
        return zero, Fraction(out_positions * area * layer.filters, layer.groups), zero, zero
    if isinstance(layer, CONV):
        area = math.prod(layer.kernel_size)
        return zero, zero, Fraction(out_positions * area, layer.groups), zero
    if isinstance(layer, L.Dense):
        return zero, zero, Fraction(math.prod(in_shape[1:-1])), zero
    if isinstance(layer, L.MultiHeadAttention):
        return _attention_mac_terms(layer, in_shape)
    if isinstance(layer, L.Attention):  # query (batch, ..., queries, key size) first
        attended = Fraction(out_positions * in_shape[-2])  # as many keys as queries
        return zero, attended, zero, attended
    return zero, zero, zero, zero


def _attention_mac_terms(layer: Any, in_shape: tuple) -> tuple[Fraction, ...]:
    """Self-attention with all its heads (see `_attention_parts`)."""
    part = _attention_parts(layer, in_shape)
    heads = part["heads"]
    return (
        Fraction(heads * part["scores"]),
        Fraction(heads * part["per_input"]),
        Fraction(0),
        Fraction(heads * part["per_output"]),
    )


def _attention_parts(layer: Any, in_shape: tuple) -> dict:
    """Self-attention's costs per head: MACs per input channel (the query, key and value
    projections), MACs of the scores and of their weighted sum over the attended
    positions, MACs per output channel (the output projection); params likewise."""
    config = layer.get_config()
    key_dim = config["key_dim"]
    value_dim = config["value_dim"] or key_dim
    positions = math.prod(in_shape[1:-1])
    axes = config["attention_axes"] or range(1, len(in_shape) - 1)
    attended = math.prod(in_shape[a] for a in axes)
    bias, projected = float(config["use_bias"]), 2 * key_dim + value_dim
    return {
        "heads": config["num_heads"],
        "per_input": positions * projected,
        "scores": positions * attended * (key_dim + value_dim),
        "per_output": positions * value_dim,
        "params_per_input": float(projected),
        "bias_per_head": bias * projected,
        "params_per_output": float(value_dim),
        "bias": bias,
    }


def layer_macs(layer: Any, in_shape: tuple, out_shape: tuple) -> int:
    """Exact MACs of one call of `layer` (batch size 1)."""
    m0, a, b, c = mac_terms(layer, in_shape, out_shape)
    cin, cout = in_shape[-1], out_shape[-1]
    return int(m0 + a * cin + b * cin * cout + c * cout)


def profile(model: Any, block: tuple | str | None = None) -> Profile:
    """MACs and parameters of a functional or Sequential model.

    Args:
        model: a functional or built Sequential tf_keras model (nested models are
            counted layer by layer).
        block: also count Dense, Conv2D and DepthwiseConv2D kernels in the block
            format (`tfhybrid.blocks`, blocks of this shape) where that stores them in
            fewer bits, e.g. `(1, 4)` for a model compressed with
            `th.Unify(block=(1, 4))`, and their `multiplies`.

    Returns:
        A `Profile` with `.macs`, `.params` and the per-layer breakdown.
    """
    flat = graph.flatten(model)
    costs, counted, uncounted = [], set(), []
    for op in graph.ops(flat):
        layer = op.layer
        in_shape = tuple(op.inputs[0].shape) if op.inputs else ()
        out_shape = tuple(op.outputs[0].shape)
        macs = layer_macs(layer, in_shape, out_shape) if op.inputs else 0
        if macs == 0 and _multiplies_unknown_kernel(layer):
            uncounted.append(f"'{layer.name}' ({type(layer).__name__})")
        params = 0 if id(layer) in counted else layer.count_params()
        counted.add(id(layer))
        costs.append(LayerCost(layer.name, type(layer).__name__, out_shape[1:], macs, params))
    if uncounted:
        warnings.warn(
            f"profile counts 0 MACs for layers of types it does not know: {', '.join(uncounted)}"
            ". For a search model from tfhybrid.hybrid_compress, profile "
            "tfhybrid.strip(model) instead.",
            stacklevel=2,
        )
    weights = [np.asarray(w) for w in model.weights]
    nonzero = [int(np.count_nonzero(w)) for w in weights]
    bits = sum(plain_encoding(w)[1] for w in weights)
    multiplied = {}  # blocked layer name -> share of its MACs that multiply
    if block is not None:
        for layer in flat.layers:
            if in_blocks(layer, block):
                saved, multiplied[layer.name] = _in_blocks(layer, block)
                bits -= saved
    return Profile(
        macs=sum(c.macs for c in costs),
        params=model.count_params(),
        layers=costs,
        nonzero_params=sum(nonzero),
        bits=bits,
        multiplies=round(sum(c.macs * multiplied.get(c.name, 1.0) for c in costs)),
    )


def _in_blocks(layer: Any, block: tuple | str) -> tuple[int, float]:
    """(bits the block format saves on `layer`'s kernel against `plain_encoding`, at
    least 0; the share of its MACs that multiply: one per free weight and per unified
    block, none in a pruned block)."""
    kernel = kernel_of(layer).numpy()
    plain = plain_encoding(kernel)[1]
    encoding = encode_blocks(kernel.reshape(blocked_shape(layer)), block)
    multiplied = (encoding.free.size + encoding.magnitudes.size) / kernel.size
    return max(0, plain - encoding.bits), multiplied


def plain_encoding(weight: np.ndarray) -> tuple[str, int]:
    """The cheapest of the encodings `Profile.bits` names that stores `weight` exactly.

    Returns:
        (kind, bits): "float32" (32 per entry), "sparse" (32 per non-zero and a
        one-bit-per-entry bitmap) or "table" (an index of ceil(log2 k) bits, at least 1,
        per entry and the k distinct values at 32 bits each; only for k <= 256), and its
        bits. `th.save_compact` writes each tensor in the kind this chooses.
    """
    options = {"float32": 32 * weight.size, "sparse": 32 * np.count_nonzero(weight) + weight.size}
    if np.unique(weight.ravel()[:1024]).size <= 256:  # most float tensors: no table
        distinct = np.unique(weight).size
        if distinct <= 256:
            options["table"] = table_index_bits(distinct) * weight.size + 32 * distinct
    kind = min(options, key=options.get)
    return kind, int(options[kind])


def table_index_bits(distinct: int) -> int:
    """Bits of each entry's index into a table of `distinct` values (at least 1)."""
    return max(1, math.ceil(math.log2(max(distinct, 2))))


def _multiplies_unknown_kernel(layer: Any) -> bool:
    """True for a layer `mac_terms` gave 0 MACs although it holds a weight matrix
    (two or more axes longer than 1: a kernel, not a per-channel scale); an
    Embedding's matrix is a lookup table, not multiplied."""
    return not isinstance(layer, L.Embedding) and any(_is_matrix(w) for w in layer.weights)


def _is_matrix(weight: Any) -> bool:
    return sum(d > 1 for d in weight.shape) >= 2


def param_terms(layer: Any, channels_in: int) -> tuple[float, float, float, float]:
    """The terms (p0, pa, pb, pc) of `params = p0 + pa*cin + pb*cin*cout + pc*cout`."""
    bias = float(getattr(layer, "use_bias", False))
    if isinstance(layer, DEPTHWISE_CONV):
        mult = layer.depth_multiplier
        return 0.0, math.prod(layer.kernel_size) * mult + bias * mult, 0.0, 0.0
    if isinstance(layer, SEPARABLE_CONV):
        mult = layer.depth_multiplier
        return 0.0, math.prod(layer.kernel_size) * mult, float(mult), bias
    if is_grouped(layer):
        per_input = math.prod(layer.kernel_size) * layer.filters / layer.groups
        return 0.0, per_input + bias * layer.filters / channels_in, 0.0, 0.0
    if isinstance(layer, (*TRANSPOSED_CONV, *CONV)):
        return 0.0, 0.0, math.prod(layer.kernel_size) / layer.groups, bias
    if isinstance(layer, L.Dense):
        return 0.0, 0.0, 1.0, bias
    if isinstance(layer, L.MultiHeadAttention):
        part = _attention_parts(layer, (None, channels_in))
        heads = part["heads"]
        return (
            heads * part["bias_per_head"],
            heads * part["params_per_input"],
            0.0,
            heads * part["params_per_output"] + part["bias"],
        )
    per_channel = sum(
        w.shape.num_elements() / channels_in
        for w in layer.weights
        if channels_in > 1 and w.shape.rank and w.shape[-1] == channels_in
    )
    return float(layer.count_params() - per_channel * channels_in), per_channel, 0.0, 0.0


@dataclasses.dataclass
class LayerTerms:
    """Cost of one layer call as a function of its channel counts (and rank).

    Attributes:
        name: layer name.
        inputs: layout ((group id, mult), ...) of the layer's (first) input.
        outputs: layout of its output.
        macs: (m0, a, b, c) of `MACs = m0 + a*cin + b*cin*cout + c*cout`.
        params: (p0, pa, pb, pc) of `params = p0 + pa*cin + pb*cin*cout + pc*cout`.
        factored: for Dense/Conv2D that may be split: (area, positions) with which
            the split costs `positions*(area*cin*r + r*cout)` MACs and
            `area*cin*r + r*cout + pc*cout` params; None otherwise.
        input_positions: for those, the positions of the layer's input (a Tucker-2
            form's first 1 x 1 conv runs there, before any stride).
        kernel_per_input: a depthwise kernel's entries per input channel (they are in
            `pa`); the kernel's entries are `pb*cin*cout + kernel_per_input*cin`.
        part: which of the layer's kernels this term costs, for a layer with several
            (an attention layer's "query", "key", "value", "output"); "" otherwise.
    """

    name: str
    inputs: tuple
    outputs: tuple
    macs: tuple
    params: tuple
    factored: tuple | None = None
    input_positions: float = 0.0
    kernel_per_input: float = 0.0
    part: str = ""

    @property
    def key(self) -> str:
        """What decisions per kernel are keyed by (`kernel_key`)."""
        return kernel_key(self.name, self.part)


#: An attention layer's projections: the parts its kernels are costed as, in the order
#: of its weights.
PROJECTIONS = ("query", "key", "value", "output")


def projection_matrix(shape: tuple, part: str) -> tuple[int, int]:
    """The (rows, columns) of an attention projection's kernel of `shape` as the matrix
    its channel layouts describe: input channels x heads * head size for the query, key
    and value; heads * value size x output channels for the output."""
    if part == PROJECTIONS[-1]:
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def kernel_key(layer_name: str, part: str = "") -> str:
    """The key of one kernel of a layer in per-kernel decisions: the layer's name, or
    `<name>/<part>` for one of several (an attention layer's `PROJECTIONS`)."""
    return f"{layer_name}/{part}" if part else layer_name


class CostModel:
    """MACs and params of a model as a function of group channel counts and ranks.

    The same arithmetic serves exact counts (ints), numpy arrays and tensors (the
    differentiable budget), so the penalty, the budget projection and
    `profile(strip(model))` agree.

    Args:
        terms: one `LayerTerms` per layer call.
        sizes: channel count of every group, by id.
        latency: a measured `latency.LatencyTable` of the model: `costs` then also
            gives "latency" in ms (see `with_latency`).
    """

    def __init__(
        self,
        terms: list[LayerTerms],
        sizes: list[int],
        latency: latency_lib.LatencyTable | None = None,
    ):
        self.terms = terms
        self.sizes = list(sizes)
        self.latency = latency

    @classmethod
    def from_analysis(cls, analysis: Any) -> CostModel:
        """Cost terms of the model that `channels.analyze` looked at."""
        terms, counted = [], set()
        for op in graph.ops(analysis.model):
            if not op.inputs:
                continue
            layer = op.layer
            in_shape, out_shape = tuple(op.inputs[0].shape), tuple(op.outputs[0].shape)
            first = id(layer) not in counted
            counted.add(id(layer))
            heads = (
                analysis.heads_group(layer.name)
                if isinstance(layer, L.MultiHeadAttention)
                else None
            )
            if heads is not None:
                terms += _attention_terms(layer, analysis, op, heads.id, first)
                continue
            macs = tuple(float(t) for t in mac_terms(layer, in_shape, out_shape))
            params = param_terms(layer, in_shape[-1] or 1) if first else (0.0, 0.0, 0.0, 0.0)
            factored, input_positions, kernel_per_input = None, 0.0, 0.0
            if isinstance(layer, DEPTHWISE_CONV) and first:
                kernel_per_input = float(math.prod(layer.kernel_size) * layer.depth_multiplier)
            if is_factorable(layer):
                area = math.prod(getattr(layer, "kernel_size", (1,)))
                factored = (float(area), float(math.prod(out_shape[1:-1])))
                input_positions = float(math.prod(in_shape[1:-1]))
            terms.append(
                LayerTerms(
                    layer.name,
                    analysis.layout(op.inputs[0]),
                    analysis.layout(op.outputs[0]),
                    macs,
                    params,
                    factored,
                    input_positions,
                    kernel_per_input,
                )
            )
        return cls(terms, [g.size for g in analysis.groups])

    def with_latency(self, table: latency_lib.LatencyTable) -> CostModel:
        """This cost model that also counts latency, from `table`.

        Each layer in the table costs its interpolated latency at its kept channels (and,
        split at rank r, its first factor's with r outputs plus its second factor's);
        the rest of the model costs `table.rest_ms`, whatever is kept.

        Raises:
            ValueError: if the table was measured on another model: a layer it names
                is not here, has other channel counts, or a layer that multiplies by
                weights here is not in it.
        """
        by_name = {t.name: t for t in self.terms}
        for name, lat in table.layers.items():
            if name not in by_name:
                raise ValueError(
                    f"The latency table times layer '{name}', which this model does not "
                    "have: it was measured on another model. Measure this model's table "
                    "(`python -m tfhybrid latency-table model.keras`)."
                )
            term = by_name[name]
            full = (round(self._width(term.inputs)), round(self._width(term.outputs)))
            if full != (lat.cin[-1], lat.cout[-1]):
                raise ValueError(
                    f"Layer '{name}' has {full[0]} input and {full[1]} output channels, "
                    f"the latency table's {lat.cin[-1]} and {lat.cout[-1]}: it was measured "
                    "on another model. Measure this model's table."
                )
        missing = sorted(
            {t.name for t in self.terms if any(t.macs)} - set(table.layers) - set(table.untimed)
        )
        if missing:
            raise ValueError(
                f"The latency table has no latency for {missing}: it was measured on "
                "another model. Measure this model's table."
            )
        return CostModel(self.terms, self.sizes, table)

    def _width(self, layout: tuple, counts: dict | None = None) -> float:
        """Channels of a tensor of this `layout` for group `counts` (others whole)."""
        counts = counts or {}
        return sum(mult * counts.get(gid, self.sizes[gid]) for gid, mult in layout)

    def evaluate(
        self, counts: dict | None = None, ranks: dict | None = None, densities: dict | None = None
    ) -> tuple:
        """(MACs, params) for group channel counts, layer ranks and kernel densities.

        Args:
            counts: group id -> channels kept (number or tensor); others keep all.
            ranks: layer name -> rank (number or tensor) for layers that may be
                split; a layer counts as split only where that needs fewer MACs.
            densities: layer name -> share of its (whole) kernel's weights that are
                non-zero: params count the non-zeros; MACs stay dense, as a runtime
                without sparse kernels multiplies the zeros too.

        Returns:
            (MACs, params): ints for numbers, float32 scalar tensors if any count,
            rank or density is a tensor (then differentiable in them).
        """
        costs = self.costs(counts, ranks, densities)
        if tf.is_tensor(costs["macs"]):
            return costs["macs"], costs["params"]
        return int(round(float(costs["macs"]))), int(round(float(costs["params"])))

    def costs(
        self,
        counts: dict | None = None,
        ranks: dict | None = None,
        densities: dict | None = None,
        bits: dict | None = None,
        tucker: dict | None = None,
        blocks: dict | None = None,
        lowrank_sparse: dict | None = None,
        stored: dict | None = None,
    ) -> dict:
        """{"macs", "params", "bits"} for the decisions (see `evaluate`).

        Bits count storage: 32 per float32 parameter (non-zeros only); a kernel with a
        density below 1 adds one bit per entry of its dense shape (the bitmap of where
        its non-zeros are); a kernel in `bits` stores, instead of its float32 values,
        one index per entry and a table of float32 values.

        Args:
            counts, ranks, densities: as for `evaluate`.
            bits: layer name -> (bits of each entry's index, values in its table), for
                kernels whose weights share a few values (clustering, quantization).
            tucker: layer name -> (r1, r2): the layer as a Tucker-2 chain, a 1 x 1
                conv to r1 channels (at the input's positions), its k x k conv to r2
                channels and a 1 x 1 conv back (at the output's positions), counted
                as given.
            blocks: layer name -> `tfhybrid.blocks.BlockShares`: its kernel in blocks,
                unified ones storing one magnitude (float32, or fewer bits on a step
                per kernel) and a sign bit per weight,
                pruned ones nothing, the rest float32, plus a code per block saying
                which. The pruned weights do not count as parameters; MACs stay dense
                (see `tfhybrid.techniques.unify`).
            lowrank_sparse: layer name (`<layer>/<part>` for one of an attention layer's
                projections, see `LayerTerms.key`) -> (rank, density): the kernel as a low-rank part
                (a pair split at that rank, or for a rank (r1, r2) a Tucker-2 chain as in
                `tucker`; whatever it costs) plus a parallel sparse kernel of its whole
                shape with that share of non-zeros (bitmap indexed). MACs add
                both branches, the sparse one dense (see `tfhybrid.techniques.sparse`).
            stored: layer name -> (params, bits): its kernel counted as that many
                (non-zero) parameters stored in that many bits, as a technique stores it
                (e.g. LC's quantized or additive kernels); its bias and the rest of the
                layer as usual. MACs stay dense.

        Returns:
            Floats (float64) for numbers, float32 scalar tensors if any decision is a
            tensor (then differentiable in them), (N,) arrays for (N,) arrays; with a
            latency table (`with_latency`) also "latency", in ms.
        """
        decided = [counts or {}, ranks or {}, densities or {}, bits or {}, tucker or {}]
        decided += [blocks or {}, lowrank_sparse or {}, stored or {}]
        values = [v for d in decided for v in d.values()]
        tensors = any(tf.is_tensor(v) for v in tf.nest.flatten(values))
        return self._evaluate(*decided[:2], _TF if tensors else _NUMPY, *decided[2:])

    def kernel_matrix(self, name: str, counts: dict | None = None) -> tuple[float, float, float]:
        """(rows, cols, positions) of layer `name`'s kernel as a matrix, for group counts.

        rows = kernel area * input channels, cols = output channels; positions add up
        over the layer's calls. Split at rank r the layer costs positions * r * (rows +
        cols) MACs and r * (rows + cols) params; whole, positions * rows * cols MACs and
        rows * cols params (biases aside).

        Raises:
            ValueError: if `name` is not a Dense/Conv2D that this model may split.
        """
        calls = [t for t in self.terms if t.name == name and t.factored is not None]
        if not calls:
            raise ValueError(f"Layer {name!r} is not a Dense/Conv2D layer that can be split.")
        first = calls[0]
        positions = sum(t.factored[1] for t in calls)
        rows = first.factored[0] * self._width(first.inputs, counts)
        return rows, self._width(first.outputs, counts), positions

    def _evaluate(
        self,
        counts: dict,
        ranks: dict,
        xp: Any,
        densities: dict,
        bits: dict,
        tucker: dict,
        blocks: dict,
        lowrank_sparse: dict,
        stored_kernels: dict,
    ) -> dict:
        arr = {k: xp.const(v) for k, v in self._arrays().items()}
        group_counts = xp.stack([counts.get(g, size) for g, size in enumerate(self.sizes)])
        cin = xp.matvec(arr["inputs"], group_counts)
        cout = xp.matvec(arr["outputs"], group_counts)
        rank = xp.stack([ranks.get(t.name, 0) for t in self.terms])
        m0, a, b, c, p0, pa, pb, pc = (
            arr[k] for k in ("m0", "a", "b", "c", "p0", "pa", "pb", "pc")
        )
        full_macs = m0 + a * cin + b * cin * cout + c * cout
        unpruned = {name: 1.0 - shares.pruned for name, shares in blocks.items()}
        density = xp.stack([densities.get(t.name, unpruned.get(t.name, 1.0)) for t in self.terms])
        per_input = arr["kernel_per_input"]
        entries = pb * cin * cout + per_input * cin
        full_params = p0 + (pa - per_input) * cin + entries * density + pc * cout
        sparse = np.array([t.name in densities for t in self.terms], float)
        split_macs = arr["positions"] * (arr["area"] * cin * rank + rank * cout)
        split_params = (arr["area"] * cin * rank + rank * cout + pc * cout) * arr["first"]
        ranked = np.array([t.factored is not None and t.name in ranks for t in self.terms])
        split = xp.logical_and(ranked, split_macs < full_macs)
        macs = xp.pick(ranked, split, split_macs, full_macs)
        params = xp.pick(ranked, split, split_params, full_params)
        if tucker:
            chained = np.array([t.factored is not None and t.name in tucker for t in self.terms])
            r1 = xp.stack([tucker.get(t.name, (0, 0))[0] for t in self.terms])
            r2 = xp.stack([tucker.get(t.name, (0, 0))[1] for t in self.terms])
            core = arr["area"] * r1 * r2
            tucker_macs = arr["input_positions"] * cin * r1 + arr["positions"] * (core + r2 * cout)
            tucker_params = (cin * r1 + core + r2 * cout + pc * cout) * arr["first"]
            macs = xp.where(chained, tucker_macs, macs)
            params = xp.where(chained, tucker_params, params)
        paired = np.zeros(len(self.terms))
        if lowrank_sparse:
            paired = np.array(
                [t.factored is not None and t.key in lowrank_sparse for t in self.terms], float
            )
            decided = [lowrank_sparse.get(t.key, (0, 1.0)) for t in self.terms]
            cored = np.array([isinstance(rank, (tuple, list)) for rank, _ in decided])
            r1 = xp.stack([rank[0] if chain else rank for (rank, _), chain in zip(decided, cored)])
            r2 = xp.stack([rank[1] if chain else rank for (rank, _), chain in zip(decided, cored)])
            pair_density = xp.stack([density for _, density in decided])
            area, positions = arr["area"], arr["positions"]
            pair = area * cin * r1 + r1 * cout  # U's and V's weights
            chain = cin * r1 + area * r1 * r2 + r2 * cout  # U's, the core's and V's
            low_macs = xp.where(
                cored,
                arr["input_positions"] * cin * r1 + positions * (chain - cin * r1),
                positions * pair,
            )
            low_params = (xp.where(cored, chain, pair) + pc * cout) * arr["first"]
            macs = xp.where(paired > 0, low_macs + full_macs, macs)
            params = xp.where(paired > 0, low_params + entries * pair_density, params)
        shared = np.array([t.name in bits for t in self.terms], float)
        index_bits = np.array([bits.get(t.name, (0, 0))[0] for t in self.terms], float)
        table = np.array([bits.get(t.name, (0, 0))[1] for t in self.terms], float)
        # A shared-value kernel's entries store an index each instead of 32 bits.
        bitmap = np.maximum(sparse, paired)
        stored = 32.0 * params + bitmap * entries + shared * (entries * (index_bits - 32.0))
        stored = stored + 32.0 * table
        if blocks:
            blocked = np.array([t.name in blocks for t in self.terms], float)
            per_entry = np.array(
                [blocks[t.name].bits_per_entry() if t.name in blocks else 0.0 for t in self.terms]
            )
            # Its kernel's entries store `per_entry` bits each instead of 32 per non-zero.
            stored = stored + blocked * entries * (per_entry - 32.0 * density)
        if stored_kernels:
            counted = np.array([t.name in stored_kernels for t in self.terms])
            kernel_params = xp.stack([stored_kernels.get(t.name, (0, 0))[0] for t in self.terms])
            kernel_bits = xp.stack([stored_kernels.get(t.name, (0, 0))[1] for t in self.terms])
            rest = params - entries * density  # the bias and what else is not the kernel
            params = xp.where(counted, rest + kernel_params, params)
            stored = xp.where(counted, 32.0 * rest + kernel_bits, stored)
        costs = {"macs": xp.sum(macs), "params": xp.sum(params), "bits": xp.sum(stored)}
        if self.latency is not None:
            costs["latency"] = self._latency(xp, cin, cout, rank, ranked, split)
        return costs

    def _latency(self, xp: Any, cin, cout, rank, ranked, split) -> Any:
        """The table's latency (ms) at these channel counts and ranks (see `with_latency`)."""
        arr = self._arrays()
        grids = (arr["lat_cin"], arr["lat_cout"])
        highs = (arr["lat_cin_high"], arr["lat_cout_high"])
        table, second_table = xp.const(arr["lat_ms"]), xp.const(arr["lat_split"])
        interpolate = latency_lib.interpolate
        whole = interpolate(table, grids, (cin, cout), xp, highs)
        first = interpolate(table, grids, (cin, rank), xp, highs)
        second = interpolate(second_table, grids[1:] * 2, (rank, cout), xp, highs[1:] * 2)
        per_layer = xp.pick(ranked, split, first + second, whole) * arr["lat_timed"]
        return self.latency.rest_ms + xp.sum(per_layer)

    def _arrays(self) -> dict:
        """The terms as arrays: layouts as (terms x groups) matrices of multipliers."""
        if not hasattr(self, "_cache"):
            shape = (len(self.terms), len(self.sizes))
            inputs, outputs = np.zeros(shape), np.zeros(shape)
            for i, t in enumerate(self.terms):
                for gid, mult in t.inputs:
                    inputs[i, gid] += mult
                for gid, mult in t.outputs:
                    outputs[i, gid] += mult
            macs = np.array([t.macs for t in self.terms], np.float64).reshape(-1, 4)
            params = np.array([t.params for t in self.terms], np.float64).reshape(-1, 4)
            factored = np.array([t.factored or (0.0, 0.0) for t in self.terms], np.float64)
            self._cache = {
                "inputs": inputs,
                "outputs": outputs,
                **{k: macs[:, i] for i, k in enumerate(("m0", "a", "b", "c"))},
                **{k: params[:, i] for i, k in enumerate(("p0", "pa", "pb", "pc"))},
                "area": factored[:, 0],
                "positions": factored[:, 1],
                "input_positions": np.array([t.input_positions for t in self.terms], np.float64),
                "kernel_per_input": np.array([t.kernel_per_input for t in self.terms]),
                "first": np.array([float(any(t.params)) for t in self.terms]),
            }
            if self.latency is not None:
                self._cache.update(_latency_arrays(self.terms, self.latency))
        return self._cache

    def get_config(self) -> dict:
        return {
            "terms": [dataclasses.asdict(t) for t in self.terms],
            "sizes": self.sizes,
            "latency": self.latency and self.latency.get_config(),
        }

    @classmethod
    def from_config(cls, config: dict) -> CostModel:
        terms = []
        for t in config["terms"]:
            t = dict(t)
            t["inputs"] = tuple(tuple(seg) for seg in t["inputs"])
            t["outputs"] = tuple(tuple(seg) for seg in t["outputs"])
            macs = tuple(t["macs"])
            t["macs"] = (0.0, *macs, 0.0) if len(macs) == 2 else macs  # saved as (a, b) before
            t["params"] = tuple(t["params"])
            t["factored"] = tuple(t["factored"]) if t["factored"] is not None else None
            terms.append(LayerTerms(**t))
        latency = config.get("latency")
        table = latency and latency_lib.LatencyTable.from_config(latency)
        return cls(terms, config["sizes"], table)


def _latency_arrays(terms: list[LayerTerms], table: latency_lib.LatencyTable) -> dict:
    """The table per layer call, its grids padded to one size: "lat_cin" (T, I),
    "lat_cout" (T, J), their real ends "lat_cin_high"/"lat_cout_high" (T,), "lat_ms"
    (T, I, J), "lat_split" (T, J, J) (a layer whose split the table did not time costs
    its whole time more when split) and "lat_timed" (T,), 1 where the table times the
    call (the other calls' grids are placeholders)."""
    timed = [table.layers.get(t.name) for t in terms]
    placeholder = latency_lib.LayerLatency((1,), (1,), ((0.0,),))
    timed_or_not = [lat or placeholder for lat in timed]
    rows = max(len(lat.cin) for lat in timed_or_not)
    cols = max(len(lat.cout) for lat in timed_or_not)
    return {
        "lat_cin": np.array([latency_lib.pad_grid(lat.cin, rows) for lat in timed_or_not]),
        "lat_cout": np.array([latency_lib.pad_grid(lat.cout, cols) for lat in timed_or_not]),
        "lat_cin_high": np.array([float(lat.cin[-1]) for lat in timed_or_not]),
        "lat_cout_high": np.array([float(lat.cout[-1]) for lat in timed_or_not]),
        "lat_ms": np.stack([latency_lib.pad_values(lat.ms, rows, cols) for lat in timed_or_not]),
        "lat_split": np.stack(
            [
                latency_lib.pad_values(lat.split, cols, cols)
                if lat.split
                else np.full((cols, cols), lat.ms[-1][-1])  # unmeasured: no faster split
                for lat in timed_or_not
            ]
        ),
        "lat_timed": np.array([float(lat is not None) for lat in timed]),
    }


def _attention_terms(layer: Any, analysis: Any, op: Any, heads: int, first: bool) -> list:
    """Self-attention as five terms in its heads' count h: the query, key and value
    projections (each a Dense from cin to h * its head size, part "query", "key",
    "value"), the scores and their weighted sum (h), the output projection (a Dense from
    h * value_dim to cout, part "output"). The projections may be costed as split
    (`LayerTerms.factored`), e.g. by LowRankSparse, under the keys `<layer>/<part>`."""
    config = layer.get_config()
    key_dim = config["key_dim"]
    value_dim = config["value_dim"] or key_dim
    part = _attention_parts(layer, tuple(op.inputs[0].shape))
    positions = float(math.prod(op.inputs[0].shape[1:-1]))
    bias, zero = part["bias"], (0.0, 0.0, 0.0, 0.0)
    inputs, outputs = analysis.layout(op.inputs[0]), analysis.layout(op.outputs[0])

    def projection(name: str, ins: tuple, outs: tuple) -> LayerTerms:
        params = (0.0, 0.0, 1.0, bias) if first else zero
        return LayerTerms(
            layer.name, ins, outs, (0.0, 0.0, positions, 0.0), params, (1.0, positions),
            positions, part=name,
        )  # fmt: skip

    per_head = dict(zip(PROJECTIONS, (key_dim, key_dim, value_dim)))
    return [
        *(projection(name, inputs, ((heads, size),)) for name, size in per_head.items()),
        LayerTerms(layer.name, ((heads, 1),), (), (0.0, float(part["scores"]), 0.0, 0.0), zero),
        projection("output", ((heads, value_dim),), outputs),
    ]


class _NUMPY:
    """Array operations of `CostModel._evaluate` on numbers (float64)."""

    const = staticmethod(lambda array: array)
    pick = staticmethod(lambda _ranked, split, yes, no: np.where(split, yes, no))
    stack = staticmethod(lambda values: np.stack(np.broadcast_arrays(*values), -1).astype(float))
    matvec = staticmethod(lambda matrix, vectors: vectors @ matrix.T)
    logical_and = np.logical_and
    where = staticmethod(np.where)
    sum = staticmethod(lambda values: np.sum(values, axis=-1))
    clip = staticmethod(np.clip)
    minimum, maximum = staticmethod(np.minimum), staticmethod(np.maximum)


class _TF:
    """Array operations of `CostModel._evaluate` on tensors (float32, differentiable)."""

    @staticmethod
    def const(array):
        return tf.constant(array, tf.float32)

    @staticmethod
    def stack(values):
        """The values as one float32 vector: the numbers as one constant and the
        tensors scattered into it (a layer's rank or density is a number for most
        layers; an op per number made DenseNet121's search graph thousands of ops
        larger, and the first training step's graph optimization that much slower)."""
        fixed = np.array([0.0 if tf.is_tensor(v) else float(v) for v in values], np.float32)
        where = [[i] for i, v in enumerate(values) if tf.is_tensor(v)]
        if not where:
            return tf.constant(fixed)
        tensors = tf.stack([tf.cast(values[i], tf.float32) for (i,) in where])
        return fixed + tf.scatter_nd(where, tensors, fixed.shape)

    matvec = staticmethod(tf.linalg.matvec)

    @staticmethod
    def pick(ranked, split, if_split, if_whole):
        """min(split, whole) in value; for ranked layers, the split form's gradient.

        A layer under rank search may start at its break-even rank, where the split is
        not cheaper yet: the plain minimum would give the rank no gradient at all.
        """
        value = tf.where(split, if_split, if_whole)
        return tf.where(ranked, if_split + tf.stop_gradient(value - if_split), value)

    logical_and = tf.logical_and
    minimum, maximum = staticmethod(tf.minimum), staticmethod(tf.maximum)

    @staticmethod
    def sum(values):
        return tf.reduce_sum(values, axis=-1)

    @staticmethod
    def clip(values, low, high):
        return tf.clip_by_value(values, tf.cast(low, tf.float32), tf.cast(high, tf.float32))

    @staticmethod
    def where(condition, yes, no):
        return tf.where(condition, yes, no)
