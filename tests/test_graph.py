"""graph: walking and rebuilding functional models without changing what they compute."""

import numpy as np
import pytest
import tensorflow as tf

import tfhybrid as th
from tfhybrid import graph

keras = th.keras
layers = keras.layers


def _tricky_model():
    """Two inputs, two outputs, a TF op, a shared layer and a nested Sequential."""
    image = keras.Input((6, 6, 3), name="image")
    extra = keras.Input((4,), name="extra")
    inner = keras.Sequential(
        [keras.Input((6, 6, 3)), layers.Conv2D(4, 3, name="conv"), layers.ReLU()], name="inner"
    )
    x = inner(image)
    x = tf.reduce_mean(x, axis=[1, 2])
    shared = layers.Dense(4, name="shared")
    y = shared(shared(extra))
    joined = layers.Concatenate(name="conv")([x, y])  # clashes with the inner layer's name
    return keras.Model([image, extra], {"a": layers.Dense(2)(joined), "b": y * 2.0})


def test_rebuild_copies_the_function_and_shares_nothing():
    model = _tricky_model()
    copy = graph.rebuild(model)
    data = [np.random.rand(2, 6, 6, 3).astype("f4"), np.random.rand(2, 4).astype("f4")]
    for key in ("a", "b"):
        np.testing.assert_allclose(copy(data)[key], model(data)[key], rtol=1e-6)
    originals = {id(v) for v in model.weights}
    assert not originals & {id(v) for v in copy.weights}
    assert copy.input_names == ["image", "extra"]


def test_rebuild_inlines_nested_models_and_renames_clashes():
    flat, origins = graph.flatten_with_origins(_tricky_model())
    names = [layer.name for layer in flat.layers]
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert "inner_conv" in names and "conv" in names
    assert len(names) == len(set(names))
    assert list(origins) == ["inner"] and origins["inner"][0] == "inner_conv"
    assert len(origins["inner"]) == 2 and set(origins["inner"]) <= set(names)


class _Scale(layers.Layer):
    """A custom layer whose get_config forgets its constructor argument."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        return inputs * self.factor

    def get_config(self):
        return {"name": self.name}


def test_a_layer_that_cannot_be_cloned_is_shared_with_a_warning_naming_it():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.Dense(2, name="d")(_Scale(2.0, name="scale")(inputs)))
    with pytest.warns(UserWarning, match=r"(?s)'scale' \(_Scale\) could not be cloned.*shares"):
        copy = graph.rebuild(model)
    assert copy.get_layer("scale") is model.get_layer("scale")
    assert copy.get_layer("d") is not model.get_layer("d")
    data = np.ones((2, 3), "f4")
    np.testing.assert_allclose(copy(data), model(data), rtol=1e-6)


def test_shared_layers_stay_shared():
    copy = graph.rebuild(_tricky_model())
    shared = copy.get_layer("shared")
    assert len(shared._inbound_nodes) == 2


def test_replace_can_insert_a_subgraph():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.Dense(2, name="fc")(inputs))

    def replace(op):
        if op.layer.name != "fc":
            return None
        copy = graph.copy_of(op.layer)
        return lambda x: layers.Lambda(lambda t: t * 0.0 + 1.0)(copy(x))

    replaced = graph.rebuild(model, replace)
    np.testing.assert_array_equal(replaced(np.ones((1, 3), "f4")), [[1.0, 1.0]])


def test_ops_are_topological():
    model = _tricky_model()
    seen = {id(t) for t in model.inputs}
    for op in graph.ops(model):
        assert all(id(t) in seen for t in op.inputs)
        seen.update(id(t) for t in op.outputs)


def test_unbuilt_sequential_and_non_models_are_refused():
    with pytest.raises(ValueError, match="no known input shape.*keras.Input"):
        graph.check_functional(keras.Sequential([layers.Dense(2)]))
    with pytest.raises(TypeError, match="Expected a tf_keras model"):
        graph.check_functional(layers.Dense(2))


def test_consumers_lists_every_call_of_a_tensor():
    inputs = keras.Input((4,))
    x = layers.Dense(3, name="a")(inputs)
    out = layers.Add(name="add")([layers.Dense(3, name="b")(x), x])
    model = keras.Model(inputs, out)
    found = graph.consumers(model)
    names = {tid: sorted(op.layer.name for op in calls) for tid, calls in found.items()}
    assert names[id(inputs)] == ["a"]
    assert names[id(model.get_layer("a").output)] == ["add", "b"]
    assert id(out) not in names
