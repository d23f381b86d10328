"""The main job: LeNet-5 on MNIST, compressed to <= 10% of its MACs by the learned hybrid.

    python examples/lenet_mnist.py --budget=0.1

Trains LeNet-5 (Adam, cosine-decayed learning rate), wraps it with
`tfhybrid.hybrid_compress` (filters and ranks learned together under a MAC
budget, DF), searches and fine-tunes inside one `model.fit`, strips it to a
plain smaller model and prints before/after test accuracy, MACs, params and the
per-layer table. Reads MNIST with `tfds.load("mnist")` (set TFDS_DATA_DIR to a
prepared copy when offline).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, mnist  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras

FLAGS = flags.FLAGS
flags.DEFINE_float("budget", 0.1, "Share of the original MACs to keep.")
flags.DEFINE_integer("epochs", 4, "Epochs to train the original LeNet-5.")
flags.DEFINE_integer("search_epochs", 2, "Epochs of the soft search (filters + ranks).")
flags.DEFINE_integer("finetune_epochs", 4, "Epochs of fine-tuning the frozen structure.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def run() -> dict:
    """Trains, compresses, fine-tunes; prints the comparison and returns its numbers."""
    keras.utils.set_random_seed(FLAGS.seed)
    train = mnist("train", FLAGS.batch_size, shuffle_seed=FLAGS.seed)
    test = mnist("test", 1000)
    steps_per_epoch = int(train.cardinality())

    model = compile_model(lenet5(), decay_steps=FLAGS.epochs * steps_per_epoch)
    model.fit(train, epochs=FLAGS.epochs, verbose=2)
    _, accuracy_before = model.evaluate(test, verbose=0)

    compressed = th.hybrid_compress(
        model, th.Budget(macs=FLAGS.budget), search_steps=FLAGS.search_epochs * steps_per_epoch
    )
    after_epochs = FLAGS.search_epochs + FLAGS.finetune_epochs
    compile_model(compressed, decay_steps=after_epochs * steps_per_epoch)
    compressed.fit(
        train,
        epochs=after_epochs,
        callbacks=[th.CompressionScheduler()],
        verbose=2,
    )
    small = compile_model(th.strip(compressed))
    _, accuracy_after = small.evaluate(test, verbose=0)

    before, after = th.profile(model), th.profile(small)
    print("\nCompressed model:")
    th.summary(small)
    print(f"\n{'':16}{'original':>12}{'compressed':>12}{'ratio':>8}")
    print(f"{'MACs':16}{before.macs:>12,}{after.macs:>12,}{after.macs / before.macs:>8.3f}")
    print(
        f"{'params':16}{before.params:>12,}{after.params:>12,}{after.params / before.params:>8.3f}"
    )
    print(f"{'test error':16}{1 - accuracy_before:>12.2%}{1 - accuracy_after:>12.2%}")
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
