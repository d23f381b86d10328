"""Plans: what `strip` does to a compression model, declared by its techniques.

A plan says, by layer name, which training-time layers become which plain layers
(or disappear), which channels of which channel groups go, and at which rank a
layer's kernel is kept. Techniques produce plans; `surgery.strip` executes the
merged plan and knows nothing of the techniques. Merging refuses two plans that
decide the same layer or the same channel group.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from typing import Any

import numpy as np

from tfhybrid import graph
from tfhybrid._keras import keras


@dataclasses.dataclass(frozen=True)
class PlainLayer:
    """A plain Keras layer by class, config and weights (in `get_weights` order)."""

    class_name: str
    config: dict
    weights: list

    @classmethod
    def of(cls, layer: Any, weights: list | None = None) -> PlainLayer:
        """`layer` as it is (or with `weights` instead of its own)."""
        config = layer.get_config()
        return cls(
            type(layer).__name__, config, layer.get_weights() if weights is None else weights
        )

    def call(self) -> graph.Replacement:
        """A replacement that calls a new layer of this class with these weights.

        Keyword arguments its `call` does not take (a training-time layer's extra
        inputs, such as a mask) are left out.
        """
        layer = keras.layers.deserialize({"class_name": self.class_name, "config": self.config})
        call = graph.with_weights(layer, [np.asarray(w) for w in self.weights])
        parameters = inspect.signature(layer.call).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return call
        return lambda *args, **kwargs: call(
            *args, **{k: v for k, v in kwargs.items() if k in parameters or k == "training"}
        )


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A layer kept as parts: chains of plain layers on its input, summed by an `Add`
    that takes the layer's name, then its activation (e.g. a low-rank pair beside a
    sparse kernel).

    Attributes:
        name: the layer's name (the `Add`'s).
        branches: per branch, its `PlainLayer`s in order.
        activation: the layer's activation (as its config holds it) applied to the sum.
    """

    name: str
    branches: tuple
    activation: Any = None

    def producers(self) -> list[str]:
        """The layers whose outputs the sum adds: the last one of each branch."""
        return [branch[-1].config["name"] for branch in self.branches]

    def call(self) -> graph.Replacement:
        """A replacement that calls the branches on the input and sums them."""
        chains = [[spec.call() for spec in branch] for branch in self.branches]
        add = keras.layers.Add(name=self.name)
        activation = None
        if keras.activations.get(self.activation) is not keras.activations.linear:
            activation = keras.layers.Activation(self.activation, name=f"{self.name}_activation")

        def call(inputs, *args, **kwargs):
            outputs = []
            for chain in chains:
                x = inputs
                for layer in chain:
                    x = layer(x)
                outputs.append(x)
            total = add(outputs)
            return total if activation is None else activation(total)

        return call


@dataclasses.dataclass(frozen=True)
class Attention:
    """A self-attention layer kept as plain layers: its query, key and value projections
    (each a `PlainLayer` or `Parallel` from the input to heads x head size), the heads
    split out (`Reshape`, `Permute`), the query scaled by 1/sqrt(key_dim) (`Rescaling`)
    as `MultiHeadAttention` scales it, a dot-product `Attention` core over the heads
    (softmax over the keys), the heads merged back and the output projection, which
    takes the layer's name. Inputs are (batch, tokens, channels).

    Attributes:
        name: the layer's name.
        query, key, value, output: the projections.
        heads: the number of heads.
        key_dim, value_dim: the size of each head's query and key, and of its value.
        dropout: the dropout rate on the attention weights.
    """

    name: str
    query: Any
    key: Any
    value: Any
    output: Any
    heads: int
    key_dim: int
    value_dim: int
    dropout: float = 0.0

    def producers(self) -> list[str]:
        """The layers whose outputs are the layer's output: the output projection's."""
        if isinstance(self.output, Parallel):
            return self.output.producers()
        return [self.output.config["name"]]

    def call(self) -> graph.Replacement:
        """A replacement that computes the attention with these plain layers."""
        name, layers = self.name, keras.layers
        project = {p: getattr(self, p).call() for p in ("query", "key", "value", "output")}
        size = {"query": self.key_dim, "key": self.key_dim, "value": self.value_dim}
        split = {
            p: (
                layers.Reshape((-1, self.heads, size[p]), name=f"{name}_{p}_heads"),
                layers.Permute((2, 1, 3), name=f"{name}_{p}_by_head"),
            )
            for p in size
        }
        scale = layers.Rescaling(1.0 / float(np.sqrt(self.key_dim)), name=f"{name}_scale")
        core = layers.Attention(dropout=self.dropout, name=f"{name}_core")
        merge = (
            layers.Permute((2, 1, 3), name=f"{name}_by_token"),
            layers.Reshape((-1, self.heads * self.value_dim), name=f"{name}_merged"),
        )

        def call(query, value=None, key=None, *args, **kwargs):
            value = query if value is None else value
            sources = {"query": query, "key": value if key is None else key, "value": value}
            heads = {}
            for p, source in sources.items():
                reshape, permute = split[p]
                heads[p] = permute(reshape(project[p](source)))
            attended = core([scale(heads["query"]), heads["value"], heads["key"]])
            return project["output"](merge[1](merge[0](attended)))

        return call


def part_of(
    plain: dict, name: str, weights: list, width: int | None = None, pointwise: bool = False
) -> PlainLayer:
    """One part of a layer kept as `Parallel` parts: the layer `plain` describes
    ({"class_name", "config"}), named `name`, linear, with a bias only if `weights` holds
    one.

    Args:
        plain: the layer's class name and config.
        name: the part's name.
        weights: its kernel (and bias), in the shape the part needs (a pointwise part's
            kernel may be a matrix).
        width: its output units or filters (None: the layer's).
        pointwise: for a Conv2D, make it a 1 x 1 conv (stride 1, no padding).
    """
    conv = plain["class_name"] == "Conv2D"
    config = {**plain["config"], "name": name, "activation": "linear"}
    config["use_bias"] = len(weights) > 1
    if width is not None:
        config["filters" if conv else "units"] = int(width)
    if pointwise and conv:
        config.update(kernel_size=(1, 1), strides=(1, 1), padding="valid", dilation_rate=(1, 1))
        weights = [weights[0].reshape(1, 1, *weights[0].shape[-2:]), *weights[1:]]
    return PlainLayer(plain["class_name"], config, weights)


def factor_pair(plain: dict, name: str, first: np.ndarray, second: np.ndarray, bias: list):
    """A Dense or Conv2D layer's kernel as the product `first @ second` (first: the
    kernel's rows x r, second: r x its columns), as two parts: the layer itself to r
    channels (`<name>_in`, its kernel size and stride), then a 1 x 1 (or Dense) back
    with `bias` (`<name>_out`)."""
    kernel_size = tuple(plain["config"].get("kernel_size", ()))
    rank = first.shape[-1]
    into = part_of(plain, f"{name}_in", [first.reshape(*kernel_size, -1, rank)], rank)
    back = part_of(plain, f"{name}_out", [second, *bias], pointwise=True)
    return into, back


#: Replace a layer by its first input (a gate that `strip` removes).
IDENTITY = "identity"


@dataclasses.dataclass
class Plan:
    """Decisions for `surgery.strip`, by layer name and channel group.

    Attributes:
        replace: layer name -> `PlainLayer`, `Parallel` or `Attention`, or `IDENTITY` to
            drop the layer.
        remove: sorted producer names of a channel group -> channel indices to remove.
        ranks: layer name -> rank of its kernel; the layer is split in two where that
            needs fewer MACs, else kept whole.
        sources: layer name or group key -> name of the technique that decided it.
    """

    replace: dict = dataclasses.field(default_factory=dict)
    remove: dict = dataclasses.field(default_factory=dict)
    ranks: dict = dataclasses.field(default_factory=dict)
    sources: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, technique: str, *, replace=None, remove=None, ranks=None) -> Plan:
        """A plan whose decisions all come from `technique`."""
        replace, ranks = dict(replace or {}), dict(ranks or {})
        remove = {tuple(k): np.asarray(v, int) for k, v in (remove or {}).items()}
        decided = [*replace, *remove, *(("rank", name) for name in ranks)]
        return cls(replace, remove, ranks, dict.fromkeys(decided, technique))

    def merge(self, other: Plan) -> Plan:
        """Both plans' decisions in one.

        Raises:
            ValueError: if both decide the same layer, the same layer's rank, or the
                same channel group (naming it and both techniques).
        """
        for key in set(self.sources) & set(other.sources):
            raise ValueError(
                f"Two techniques decide {_describe(key)}: {self.sources[key]} and "
                f"{other.sources[key]}. Give each layer to one technique (their `layers=` "
                "or `skip=` options)."
            )
        return Plan(
            {**self.replace, **other.replace},
            {**self.remove, **other.remove},
            {**self.ranks, **other.ranks},
            {**self.sources, **other.sources},
        )

    def key_after_replacing(self, key: tuple) -> tuple:
        """A channel group's key (its producers' names, sorted) once the layers are
        replaced: a layer kept as `Parallel` parts (or as `Attention`) produces through
        their last layers."""
        parts = {s.name: s for s in self.replace.values() if isinstance(s, (Parallel, Attention))}
        names = [n for name in key for n in (parts[name].producers() if name in parts else [name])]
        return tuple(sorted(names))

    def replacement(self, name: str) -> graph.Replacement | None:
        """What `graph.rebuild` calls for layer `name` (None: the layer as it is)."""
        spec = self.replace.get(name)
        if spec is None:
            return None
        if spec == IDENTITY:
            return lambda inputs, *args, **kwargs: inputs
        return spec.call()


def merge(plans: Iterable[Plan]) -> Plan:
    """All `plans` merged (see `Plan.merge`)."""
    merged = Plan()
    for plan in plans:
        merged = merged.merge(plan)
    return merged


def _describe(key: Any) -> str:
    if isinstance(key, tuple) and key[:1] == ("rank",):
        return f"the rank of layer '{key[1]}'"
    if isinstance(key, tuple):
        return f"the channel group produced by {list(key)}"
    return f"layer '{key}'"
