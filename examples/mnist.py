"""MNIST data and the LeNet models shared by the example and the benchmarks."""

import tensorflow as tf

import tfhybrid as th
from tfhybrid import data

keras = th.keras
layers = keras.layers


def lenet5() -> keras.Model:
    """Caffe LeNet-5 (20-50-500-10)."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(20, 5, activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(50, 5, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(500, activation="relu", name="fc1"),
            layers.Dense(10, name="fc2"),
        ],
        name="lenet5",
    )


def lenet_300_100() -> keras.Model:
    """LeNet-300-100: a 784-300-100-10 multilayer perceptron."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Flatten(name="flatten"),
            layers.Dense(300, activation="relu", name="fc1"),
            layers.Dense(100, activation="relu", name="fc2"),
            layers.Dense(10, name="fc3"),
        ],
        name="lenet_300_100",
    )


def mnist(split: str, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """MNIST from TFDS (set TFDS_DATA_DIR offline), scaled to [0, 1], batched, cached.

    Raises:
        tfhybrid.data.DataUnavailableError: MNIST is neither prepared nor downloadable.
    """
    ds = data.mnist(split).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(60_000, seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compile_model(
    model: keras.Model, learning_rate: float = 1e-3, decay_steps: int = 0
) -> keras.Model:
    """Adam and sparse cross-entropy; with `decay_steps`, the rate falls to 0 along a
    cosine over that many steps (the usual fine-tuning recipe)."""
    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
