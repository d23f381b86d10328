"""The main job: train LeNet-5 on MNIST, prune and factorize it, fine-tune, compare.

    python examples/lenet_mnist.py --epochs=2 --prune_fraction=0.5

Reads MNIST with `tfds.load("mnist")` (set TFDS_DATA_DIR to a prepared copy when
offline). Channels are pruned by L1 norm (a one-shot heuristic; the learned hybrid
method replaces it), the first Dense layer is split by truncated SVD.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid.techniques import magnitude  # noqa: E402

keras = th.keras
layers = keras.layers

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 2, "Epochs to train the original LeNet-5.")
flags.DEFINE_integer("finetune_epochs", 1, "Epochs to fine-tune the compressed model.")
flags.DEFINE_float("prune_fraction", 0.5, "Share of channels removed from every group.")
flags.DEFINE_float("fc1_energy", 0.9, "Share of fc1's squared singular values to keep.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed.")


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


def mnist(split: str, batch_size: int, shuffle: bool) -> tf.data.Dataset:
    """MNIST from TFDS, scaled to [0, 1], batched."""
    ds = tfds.load("mnist", split=split, as_supervised=True)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    if shuffle:
        ds = ds.shuffle(10_000, seed=FLAGS.seed)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compile_model(model: keras.Model) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def compress(model: keras.Model) -> keras.Model:
    """L1-norm channel pruning of every prunable group, then SVD of fc1."""
    pruned = th.prune_channels(model, magnitude.l1_removal(model, FLAGS.prune_fraction))
    fc1 = pruned.get_layer("fc1").kernel.shape
    largest_useful = (fc1[0] * fc1[1] - 1) // (fc1[0] + fc1[1])
    rank = min(magnitude.svd_rank(pruned, "fc1", FLAGS.fc1_energy), largest_useful)
    return th.factorize(pruned, {"fc1": rank})


def run() -> dict:
    """Trains, compresses, fine-tunes; prints the comparison and returns its numbers."""
    keras.utils.set_random_seed(FLAGS.seed)
    train = mnist("train", FLAGS.batch_size, shuffle=True)
    test = mnist("test", 1000, shuffle=False)

    model = compile_model(lenet5())
    model.fit(train, epochs=FLAGS.epochs, verbose=2)
    _, accuracy_before = model.evaluate(test, verbose=0)

    small = compile_model(compress(model))
    _, accuracy_pruned = small.evaluate(test, verbose=0)
    small.fit(train, epochs=FLAGS.finetune_epochs, verbose=2)
    _, accuracy_after = small.evaluate(test, verbose=0)

    before, after = th.profile(model), th.profile(small)
    print("\nCompressed model:")
    th.summary(small)
    print(f"\n{'':28}{'original':>12}{'compressed':>12}{'ratio':>8}")
    print(f"{'MACs':28}{before.macs:>12,}{after.macs:>12,}{after.macs / before.macs:>8.3f}")
    print(
        f"{'params':28}{before.params:>12,}{after.params:>12,}{after.params / before.params:>8.3f}"
    )
    print(f"{'test accuracy (no fine-tune)':28}{accuracy_before:>12.4f}{accuracy_pruned:>12.4f}")
    print(f"{'test accuracy':28}{accuracy_before:>12.4f}{accuracy_after:>12.4f}")
    return {
        "macs": (before.macs, after.macs),
        "params": (before.params, after.params),
        "accuracy": (accuracy_before, accuracy_after),
    }


def main(argv):
    del argv
    run()


if __name__ == "__main__":
    app.run(main)
