"""Architectures the tests run on, and helpers that compare models."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

import tfhybrid as th

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from mnist import lenet5 as lenet5  # noqa: E402  (the README's LeNets, re-exported)
from mnist import lenet_300_100 as lenet_300_100  # noqa: E402
from vit import small_vit  # noqa: E402

keras = th.keras
layers = keras.layers


def resnet_style() -> keras.Model:
    """A small functional ResNet: identity and projection shortcuts, pre-pool head."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, (filters, stride) in enumerate([(8, 1), (16, 2), (16, 1)]):
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"b{i}_c1")(x)
        y = layers.BatchNormalization(name=f"b{i}_bn1")(y)
        y = layers.ReLU(name=f"b{i}_relu1")(y)
        y = layers.Conv2D(filters, 3, padding="same", name=f"b{i}_c2")(y)
        y = layers.BatchNormalization(name=f"b{i}_bn2")(y)
        if stride != 1 or x.shape[-1] != filters:
            x = layers.Conv2D(filters, 1, strides=stride, name=f"b{i}_proj")(x)
            x = layers.BatchNormalization(name=f"b{i}_proj_bn")(x)
        x = layers.Add(name=f"b{i}_add")([x, y])
        x = layers.ReLU(name=f"b{i}_out")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet_style")


def nested_model() -> keras.Model:
    """A Sequential block nested in a model: its 'conv' clashes with the outer 'conv'."""
    block = keras.Sequential(
        [
            keras.Input((8, 8, 6)),
            layers.Conv2D(6, 3, padding="same", name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(name="relu"),
        ],
        name="block",
    )
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 1, name="conv")(inputs)
    shared = layers.Conv2D(6, 3, padding="same", name="shared")
    x = layers.Add(name="add")([x, block(x)])
    x = shared(x)
    x = shared(x)
    x = layers.GlobalMaxPooling2D(name="gmp")(x)
    return keras.Model(inputs, layers.Dense(3, name="head")(x))


def application(name: str, size: int = 32):
    """A builder of `keras.applications.<name>` with random weights and 10 logits."""

    def build() -> keras.Model:
        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
        )

    return build


APPLICATIONS = {
    name: application(name)
    for name in ("MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121", "MobileNet", "VGG16")
}


#: Families whose channels pass through TF ops, LayerScale, grouped convolutions,
#: LayerNormalization and self-attention.
MODERN = {
    **{
        name: application(name)
        for name in ("MobileNetV3Large", "RegNetX004", "RegNetY004", "ConvNeXtTiny")
    },
    "SmallViT": small_vit,
}


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> keras.Model:
    """Gives every BatchNorm random statistics so that signals neither vanish nor blow up.

    Freshly initialised networks (zero-gamma residual branches, unit statistics)
    pass tiny signals; random affine BNs make a masked/pruned comparison sensitive.
    ConvNeXt's LayerScales (1e-6 at start) get random scales of order 1 too, and
    LayerNormalizations random scales and offsets.
    """
    rng = np.random.default_rng(seed)
    for layer in model.submodules:
        if isinstance(layer, layers.LayerNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, w.shape)
                    if "gamma" in v.name
                    else rng.normal(0, 0.3, w.shape)
                    for v, w in zip(layer.weights, layer.get_weights())
                ]
            )
        if type(layer).__name__ == "LayerScale":
            layer.set_weights(
                [rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in layer.get_weights()]
            )
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
                    if "variance" in v.name or "gamma" in v.name
                    else rng.normal(0, 0.1, w.shape).astype(w.dtype)
                    for v, w in zip(layer.weights, layer.get_weights())
                ]
            )
    return model


def random_removal(model: keras.Model, fraction: float = 0.25, seed: int = 0) -> dict:
    """Removes `fraction` of the channels (at least one, never all) of every prunable group."""
    rng = np.random.default_rng(seed)
    remove = {}
    for group in th.channel_groups(model):
        if group.prunable and group.size > 1:
            count = min(group.size - 1, max(1, int(group.size * fraction)))
            remove[group.id] = rng.choice(group.size, count, replace=False)
    return remove


def max_relative_diff(a: keras.Model, b: keras.Model, x: np.ndarray) -> float:
    """Max |a(x) - b(x)| over the scale of a(x), in inference mode, all outputs."""
    ya = [np.asarray(t) for t in _as_list(a(x, training=False))]
    yb = [np.asarray(t) for t in _as_list(b(x, training=False))]
    scale = max(float(np.abs(t).max()) for t in ya)
    assert scale > 1e-6, "outputs vanish: the comparison would prove nothing"
    return max(float(np.abs(p - q).max()) for p, q in zip(ya, yb)) / scale


def _as_list(outputs):
    return outputs if isinstance(outputs, (list, tuple)) else [outputs]


def weights_snapshot(model: keras.Model) -> list[np.ndarray]:
    """Copies of all weights, to check that a model was not modified."""
    return [w.copy() for w in model.get_weights()]


def assert_unchanged(model: keras.Model, snapshot: list[np.ndarray], config: dict) -> None:
    """The model's weights and config equal an earlier snapshot."""
    now = model.get_weights()
    assert len(now) == len(snapshot)
    for a, b in zip(now, snapshot):
        np.testing.assert_array_equal(a, b)
    assert model.get_config() == config


def mnist_like(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random 28 x 28 x 1 inputs and labels 0..9 (for LeNet-shaped models)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, n)


def fit_search(compressed, epochs: int, n: int = 64, batch_size: int = 16) -> np.ndarray:
    """Compiles (Adam) and fits a search model on `mnist_like(n)` with the scheduler;
    returns the inputs."""
    x, y = mnist_like(n)
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [th.CompressionScheduler()]
    compressed.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=callbacks)
    return x


def near_tied_logits() -> keras.Model:
    """Ten logits, nine of them within 0.01 of each other under one that spans [-10, 0]:
    int8 rounds the near-ties together, so the top-1 class is lost (4 inputs in [0, 1])."""
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(10)
    model = keras.Model(inputs, dense(inputs))
    kernel = np.zeros((4, 10), np.float32)
    kernel[0, 0] = -10.0
    dense.set_weights([kernel, np.linspace(0, 0.009, 10, dtype=np.float32)])
    return model
