"""The main job: LeNet-5 on MNIST, compressed to <= 10% of its MACs by the learned hybrid.

    python examples/lenet_mnist.py --budget=0.1 [--save_dir=models] [--write_readme]

Trains LeNet-5 (Adam, cosine-decayed learning rate), wraps it with
`tfhybrid.hybrid_compress` (filters and ranks learned together under a MAC
budget, DF), searches and fine-tunes inside one `model.fit`, strips it to a
plain smaller model and prints before/after test error, MACs, params and the
per-layer table (original → kept). Saves both models in `--save_dir`
(`lenet5.keras`, `lenet5_small.keras`) for the command line, and with
`--write_readme` writes its results to `docs/results/demo.json` and the README's
results table. Reads MNIST with `tfds.load("mnist")` (set TFDS_DATA_DIR to a
prepared copy when offline); without it, says so in one line (exit status 2).
"""

import json
import os
import pathlib
import sys

if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") >= "2":  # unless TensorFlow's logs are wanted
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # tfhybrid then quiets TensorFlow's start-up
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfhybrid as th  # noqa: E402, I001  (before TensorFlow: it quiets TensorFlow's start-up)
from absl import app, flags  # noqa: E402
from demo_results import README_BLOCK, results_table  # noqa: E402
from mnist import compile_model, lenet5, mnist  # noqa: E402

from tfhybrid import data, report  # noqa: E402

keras = th.keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "demo.json"
README = ROOT / "README.md"
DATA_ERROR = 2

FLAGS = flags.FLAGS
flags.DEFINE_float("budget", 0.1, "Share of the original MACs to keep.")
flags.DEFINE_integer("epochs", 4, "Epochs to train the original LeNet-5.")
flags.DEFINE_integer("search_epochs", 2, "Epochs of the soft search (filters + ranks).")
flags.DEFINE_integer("finetune_epochs", 4, "Epochs of fine-tuning the frozen structure.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("save_dir", "models", "Where to save the original and compressed models.")
flags.DEFINE_bool(
    "write_readme", False, f"Write the results to {RESULTS.relative_to(ROOT)} and the README."
)


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
    result = {
        "command": "python examples/lenet_mnist.py " + " ".join(sys.argv[1:]),
        "budget": FLAGS.budget,
        "macs": [before.macs, after.macs],
        "params": [before.params, after.params],
        "test_error": [1 - accuracy_before, 1 - accuracy_after],
        "layers": report.changes(small, model),
    }
    print("\nPer layer, original → compressed:")
    th.summary(small, original=model)
    print("\n" + results_table(result))
    save(model, small, pathlib.Path(FLAGS.save_dir))
    return result


def save(model: keras.Model, small: keras.Model, folder: pathlib.Path) -> None:
    """Both models, for `python -m tfhybrid export|report` (see the README)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "lenet5.keras")
    small.save(folder / "lenet5_small.keras")
    print(f"\nSaved {folder / 'lenet5.keras'} and {folder / 'lenet5_small.keras'}.")


def write_readme(result: dict) -> None:
    """Writes `result` to docs/results/demo.json and its table into the README."""
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    text = README.read_text()
    if not README_BLOCK.search(text):
        raise ValueError(f"{README} has no '<!-- demo results: begin/end -->' block.")
    table = results_table(result)
    README.write_text(README_BLOCK.sub(lambda m: f"{m[1]}{table}\n{m[2]}", text))


def main(argv):
    del argv
    try:
        result = run()
    except data.DataUnavailableError as error:
        print(f"lenet_mnist: error: {error}", file=sys.stderr)
        sys.exit(DATA_ERROR)
    if FLAGS.write_readme:
        write_readme(result)


if __name__ == "__main__":
    app.run(main)
