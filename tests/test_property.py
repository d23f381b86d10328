"""Property: on random graphs of supported layers, masked and pruned models agree."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfhybrid as th

from models import max_relative_diff, random_removal, randomize_batchnorm

keras = th.keras
layers = keras.layers

OPS = [
    "conv",
    "depthwise",
    "separable",
    "bn",
    "act",
    "add",
    "multiply",
    "concat",
    "pool",
    "pad_crop",
    "squeeze_excite",
    "dropout",
]


def _build(data) -> keras.Model:
    """Draws a random 6x6 functional graph: every op keeps the spatial size."""
    inputs = keras.Input((6, 6, 3))
    pool = [layers.Conv2D(data.draw(st.integers(2, 8)), 3, padding="same")(inputs)]
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(OPS))
        x = data.draw(st.sampled_from(pool))
        channels = x.shape[-1]
        if op == "conv":
            x = layers.Conv2D(
                data.draw(st.integers(2, 8)), data.draw(st.sampled_from([1, 3])), padding="same"
            )(x)
        elif op == "depthwise":
            x = layers.DepthwiseConv2D(
                3, padding="same", depth_multiplier=data.draw(st.sampled_from([2, 1]))
            )(x)
        elif op == "separable":
            x = layers.SeparableConv2D(data.draw(st.integers(2, 6)), 3, padding="same")(x)
        elif op == "bn":
            x = layers.BatchNormalization()(x)
        elif op == "act":
            x = data.draw(st.sampled_from([layers.ReLU, layers.LeakyReLU, layers.PReLU]))()(x)
        elif op in ("add", "multiply"):
            same = [t for t in pool if t.shape[-1] == channels and t is not x]
            if not same:
                continue
            merge = layers.Add() if op == "add" else layers.Multiply()
            x = merge([x, data.draw(st.sampled_from(same))])
        elif op == "concat":
            x = layers.Concatenate()([x, data.draw(st.sampled_from(pool))])
        elif op == "pool":
            x = layers.MaxPooling2D(3, strides=1, padding="same")(x)
        elif op == "pad_crop":
            x = layers.Cropping2D(1)(layers.ZeroPadding2D(1)(x))
        elif op == "squeeze_excite":
            s = layers.GlobalAveragePooling2D(keepdims=True)(x)
            s = layers.Conv2D(2, 1, activation="relu")(s)
            s = layers.Conv2D(channels, 1, activation="sigmoid")(s)
            x = layers.Multiply()([x, s])
        elif op == "dropout":
            x = layers.Dropout(0.3)(x)
        pool.append(x)
    x = pool[-1]
    if data.draw(st.booleans()):
        x = layers.Flatten()(x)
    else:
        x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(4)(x))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_graphs_prune_exactly(data):
    model = randomize_batchnorm(_build(data))
    remove = random_removal(
        model, data.draw(st.floats(0.1, 0.9)), seed=data.draw(st.integers(0, 1000))
    )
    masked = th.prune_channels(model, remove, masked=True)
    pruned = th.prune_channels(model, remove)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    assert max_relative_diff(masked, pruned, x) <= 1e-4
    assert pruned.count_params() <= model.count_params()
