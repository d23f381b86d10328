"""MNIST data and the models (LeNets, a small residual CNN) shared by the example and the
benchmarks."""

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


def residual_cnn() -> keras.Model:
    """A small ResNet for MNIST with BatchNorm: a strided 3 x 3 stem to 14 x 14 x 16, two
    residual blocks there, a strided block to 7 x 7 x 32 (a 1 x 1 projection on its
    shortcut), global pooling and a Dense classifier (2.5M MACs, 25k params)."""
    inputs = keras.Input((28, 28, 1))
    x = _conv_bn(inputs, 16, 2, "stem")
    for index, (filters, strides) in enumerate([(16, 1), (16, 1), (32, 2)]):
        x = _residual_block(x, filters, strides, f"block{index + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x), name="residual_cnn")


def resnet20() -> keras.Model:
    """A ResNet-20 for MNIST (He et al.'s CIFAR design): a 3 x 3 stem to 16 channels, three
    stages of three residual blocks at 16, 32 and 64 channels (the second and third start
    with a stride of 2 and a 1 x 1 projection shortcut), BatchNorm after every conv, global
    pooling and a Dense classifier. The stem strides by 2 (stages at 14, 7 and 4 pixels),
    which keeps a CPU epoch short: 8.5M MACs, 0.27M params."""
    inputs = keras.Input((28, 28, 1))
    x = _conv_bn(inputs, 16, 2, "stem")
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage and not block else 1
            x = _residual_block(x, filters, strides, f"stage{stage + 1}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x), name="resnet20")


def mobilenet_v3_small() -> keras.Model:
    """`keras.applications.MobileNetV3Small` (random weights, 10 logits) on MNIST padded
    to 32 x 32, one functional model: depthwise-separable blocks with squeeze-and-excite
    and hard-swish, the family low rank alone gains little on. Its BatchNorm layers
    average their statistics with momentum 0.9, not the application's 0.999: the first
    conv's outputs vary about 0.01 on MNIST, and a moving variance that starts at 1 takes
    thousands of steps at 0.999 (hundreds at Keras's default 0.99) to come down to that,
    leaving inference at chance after a few epochs."""
    inputs = keras.Input((28, 28, 1))
    padded = layers.ZeroPadding2D(2, name="pad")(inputs)
    model = keras.applications.MobileNetV3Small(
        input_tensor=padded,
        weights=None,
        classes=10,
        classifier_activation=None,
        include_preprocessing=False,
    )
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def _conv_bn(x, filters: int, strides: int, name: str, activation: bool = True):
    """3 x 3 conv (no bias), BatchNorm and, with `activation`, ReLU."""
    x = layers.Conv2D(filters, 3, strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if activation else x


def _residual_block(x, filters: int, strides: int, name: str):
    """Two 3 x 3 conv-BN layers added to the input (through a 1 x 1 projection and BatchNorm
    where the block strides), then ReLU."""
    shortcut = x
    if strides > 1:
        shortcut = layers.Conv2D(filters, 1, strides, use_bias=False, name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn(x, filters, strides, f"{name}_conv1")
    y = _conv_bn(y, filters, 1, f"{name}_conv2", activation=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


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


def pretrained(build, seed: int, epochs: int, train_batches: int = 0) -> tuple:
    """A network the benchmarks compress, trained from a seed.

    Args:
        build: makes the network (e.g. `lenet5`).
        seed: sets its initialisation and the order of the training batches.
        epochs: epochs of Adam with a rate decayed along a cosine over them.
        train_batches: use only this many training batches (0: all).

    Returns:
        (the trained network, the training batches, steps per epoch).
    """
    keras.utils.set_random_seed(seed)
    train = mnist("train", 128, shuffle_seed=seed)
    if train_batches:
        train = train.take(train_batches)
    steps = int(train.cardinality())
    base = compile_model(build(), decay_steps=epochs * steps)
    base.fit(train, epochs=epochs, verbose=0)
    return base, train, steps
