"""Walk and rebuild functional and Sequential Keras models.

Everything that reads Keras's private graph structures (nodes by depth, call
arguments) lives here. The rest of tfhybrid sees a model as a list of `Op`s in
topological order and rebuilds it with `rebuild`, which can replace any layer by
a new layer or by a small subgraph.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfhybrid._keras import KerasTensor, keras


@dataclasses.dataclass(frozen=True)
class Op:
    """One call of a layer in a functional graph.

    Attributes:
        layer: the layer that was called.
        inputs: the Keras tensors passed to it, flattened.
        outputs: the Keras tensors it returned, flattened.
        call_args: positional arguments of the call (tensors and constants).
        call_kwargs: keyword arguments of the call.
    """

    layer: Any
    inputs: tuple
    outputs: tuple
    call_args: tuple
    call_kwargs: dict


#: A replacement: called like the layer it replaces, returns the new outputs.
Replacement = Callable[..., Any]


def is_graph_model(layer: Any) -> bool:
    """True for a functional or Sequential model whose layer graph is known."""
    return isinstance(layer, keras.Model) and bool(getattr(layer, "_is_graph_network", False))


def check_functional(model: Any) -> None:
    """Raises a clear error unless `model` is a functional or built Sequential model.

    Raises:
        TypeError: for objects that are not Keras models, and subclassed models.
        ValueError: for a Sequential model whose input shape is not known yet.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a tf_keras model (tfhybrid.keras.Model), got {type(model).__name__}. "
            "Build the model with tfhybrid.keras (tf_keras), not Keras 3."
        )
    if is_graph_model(model):
        return
    if isinstance(model, keras.Sequential):
        raise ValueError(
            f"Sequential model '{model.name}' has no known input shape, so its layer graph "
            "does not exist yet. Start it with keras.Input(shape=...) or call "
            "model.build(input_shape) first."
        )
    raise TypeError(
        f"Model '{model.name}' ({type(model).__name__}) is a subclassed model: tfhybrid "
        "cannot see its layer graph. Rebuild it with the functional API "
        "(inputs = keras.Input(...); outputs = layers(inputs); keras.Model(inputs, outputs)) "
        "or as a keras.Sequential, then pass that model."
    )


def ops(model: Any) -> list[Op]:
    """The layer calls of a functional model in topological order.

    Nested models appear as one `Op` each (see `flatten` to inline them).

    Args:
        model: a functional or built Sequential model.

    Returns:
        One `Op` per layer call, inputs before the calls that use them.
    """
    check_functional(model)
    result = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            result.append(
                Op(
                    layer=node.layer,
                    inputs=tuple(node.keras_inputs),
                    outputs=tuple(tf.nest.flatten(node.outputs)),
                    call_args=node.call_args,
                    call_kwargs=node.call_kwargs,
                )
            )
    return result


def consumers(model: Any) -> dict[int, list[Op]]:
    """The calls that take each Keras tensor of `model` as input, by `id` of the tensor.

    Tensors no layer consumes (model outputs only) are absent.
    """
    result: dict[int, list[Op]] = {}
    for op in ops(model):
        for kt in op.inputs:
            result.setdefault(id(kt), []).append(op)
    return result


def has_nested_models(model: Any) -> bool:
    """True if any layer of `model` is itself a functional or Sequential model."""
    return any(is_graph_model(layer) for layer in model.layers)


def clone_layer(layer: Any, **config_overrides: Any) -> Any:
    """A new, unbuilt layer of the same class and config (with `config_overrides`)."""
    config = layer.get_config()
    config.update(config_overrides)
    return layer.__class__.from_config(config)


def with_weights(layer: Any, weights: list) -> Replacement:
    """A replacement that calls `layer` and sets its weights once it is built."""
    state = {"set": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        outputs = layer(*args, **kwargs)
        if not state["set"]:
            layer.set_weights(weights)
            state["set"] = True
        return outputs

    return call


def copy_of(layer: Any, name: str | None = None) -> Replacement:
    """A replacement that calls a fresh copy of `layer` (same config and weights).

    Layers whose config cannot be round-tripped are reused as they are, with a
    warning: the new model then shares them with the original.
    """
    try:
        new = clone_layer(layer, **({"name": name} if name else {}))
    except Exception as err:  # noqa: BLE001 - any failure of user code in from_config
        warnings.warn(
            f"Layer '{layer.name}' ({type(layer).__name__}) could not be cloned from its "
            f"config ({err}); the new model shares this layer with the original. Give the "
            "layer a complete get_config() to avoid this.",
            stacklevel=3,
        )
        return layer
    return with_weights(new, layer.get_weights())


def rebuild(model: Any, replace: Callable[[Op], Replacement | None] | None = None) -> Any:
    """Builds a new functional model with the same graph, nested models inlined.

    Every layer is copied (config and weights), so the new model shares nothing
    with `model`, which is never modified. `replace(op)` may return a callable that
    stands in for the op's layer: a new layer, or a function that builds a small
    subgraph from the op's inputs. It is asked once per layer; a layer called
    several times (shared) keeps one replacement for all its calls.

    Args:
        model: a functional or built Sequential model.
        replace: optional; returns a replacement for an op, or None to copy its layer.

    Returns:
        A new functional `keras.Model` with the original's name and input names.
    """
    return _rebuild(model, replace)[0]


def flatten(model: Any) -> Any:
    """`model` itself if it has no nested models, else a copy with them inlined."""
    return flatten_with_origins(model)[0]


def flatten_with_origins(model: Any) -> tuple[Any, dict[str, list[str]]]:
    """`flatten(model)`, and per nested model (at any depth) the names its layers have
    in it: inlined layers keep their names unless that clashes, then get a prefix."""
    check_functional(model)
    return _rebuild(model, None) if has_nested_models(model) else (model, {})


def _rebuild(model: Any, replace: Callable | None) -> tuple[Any, dict[str, list[str]]]:
    check_functional(model)
    tensors: dict[int, Any] = {}
    for kt, name in zip(model.inputs, model.input_names):
        tensors[id(kt)] = keras.Input(batch_shape=kt.shape, dtype=kt.dtype, name=name)
    builder = _Builder(replace, reserved={layer.name for layer in model.layers})
    builder.run(model, tensors, prefix="")
    inputs = tf.nest.map_structure(lambda kt: tensors[id(kt)], model._nested_inputs)
    outputs = tf.nest.map_structure(lambda kt: tensors[id(kt)], model._nested_outputs)
    return keras.Model(inputs, outputs, name=model.name), builder.origins


class _Builder:
    """Replays a model's ops on new tensors, one replacement per original layer."""

    def __init__(self, replace: Callable[[Op], Replacement | None] | None, reserved: set):
        self._replace = replace
        self._calls: dict[int, Replacement] = {}
        self._used_names = set(reserved)
        self._within: list[str] = []  # the nested models being inlined, outermost first
        self.origins: dict[str, list[str]] = {}  # nested model -> names of its copied layers

    def run(self, model: Any, tensors: dict, prefix: str) -> None:
        for op in ops(model):
            args, kwargs = _resolve((op.call_args, op.call_kwargs), tensors)
            if is_graph_model(op.layer):
                self._inline(op, args, tensors, prefix)
                continue
            new_outputs = self._call_for(op, prefix)(*args, **kwargs)
            for kt, t in zip(op.outputs, tf.nest.flatten(new_outputs), strict=True):
                tensors[id(kt)] = t

    def _inline(self, op: Op, args: tuple, tensors: dict, prefix: str) -> None:
        inner = op.layer
        inner_inputs = tf.nest.flatten(inner._nested_inputs)
        for kt, t in zip(inner_inputs, tf.nest.flatten(args[0]), strict=True):
            tensors[id(kt)] = t
        self._within.append(inner.name)
        self.run(inner, tensors, prefix=f"{prefix}{inner.name}_")
        self._within.pop()
        inner_outputs = tf.nest.flatten(inner._nested_outputs)
        for kt, inner_kt in zip(op.outputs, inner_outputs, strict=True):
            tensors[id(kt)] = tensors[id(inner_kt)]

    def _call_for(self, op: Op, prefix: str) -> Replacement:
        key = id(op.layer)
        if key not in self._calls:
            call = self._replace(op) if self._replace else None
            if call is None:
                name = self._unique_name(op.layer.name, prefix)
                call = copy_of(op.layer, name=name)
                for outer in self._within:
                    self.origins.setdefault(outer, []).append(name)
            self._calls[key] = call
        return self._calls[key]

    def _unique_name(self, name: str, prefix: str) -> str | None:
        """None (keep the name) for top-level layers; a prefixed name on a clash."""
        if not prefix:
            return None
        candidate = name if name not in self._used_names else f"{prefix}{name}"
        suffix = 1
        while candidate in self._used_names:
            candidate, suffix = f"{prefix}{name}_{suffix}", suffix + 1
        self._used_names.add(candidate)
        return candidate


def _resolve(structure: Any, tensors: dict) -> Any:
    """Replaces each Keras tensor in `structure` by its counterpart in `tensors`."""
    return tf.nest.map_structure(
        lambda x: tensors[id(x)] if isinstance(x, KerasTensor) else x, structure
    )
