"""Two techniques under one budget: DF's channel masks, then TF-MOT pruning, to int8 TFLite.

    python examples/stacked_mnist.py --macs=0.1 --params=0.1 --sparsity=0.5 \
        --out=docs/results/stacked_mnist.json

Trains LeNet-5 on MNIST, compresses it with `[th.DF(ranks=False), th.Sparse(...)]` under
`Budget(macs=..., params=...)` in one `fit` (search, then fine-tuning), strips it, exports a
full-integer int8 `.tflite` with the sparse encoding, and prints the per-layer report with
the shares of the original model (MACs, non-zero params, bits) and the test errors of the
Keras and LiteRT models. Writes the figures as JSON.
"""

import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, mnist  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_float("macs", 0.1, "Share of the original MACs to keep.")
flags.DEFINE_float("params", 0.1, "Share of the original (non-zero) params to keep.")
flags.DEFINE_float("sparsity", 0.5, "Share of each kept kernel's weights TF-MOT zeroes.")
flags.DEFINE_integer("epochs", 4, "Epochs to train the original LeNet-5.")
flags.DEFINE_integer("search_epochs", 2, "Epochs of search.")
flags.DEFINE_integer("finetune_epochs", 4, "Epochs of fine-tuning after the search.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", "", "Write the figures here as JSON.")


def tflite_error(path: str, test) -> float:
    """Test error of the int8 `.tflite` file in LiteRT's built-in kernels (XNNPACK, its
    default delegate, refuses int8 fully-connected layers in the sparse encoding)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=path, experimental_op_resolver_type=builtin)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    scale, zero = inp["quantization"]
    wrong = total = 0
    for images, labels in test.unbatch().batch(1).take(2000):
        quantized = np.round(images.numpy() / scale + zero).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], quantized)
        interpreter.invoke()
        wrong += int(np.argmax(interpreter.get_tensor(out["index"])) != int(labels[0]))
        total += 1
    return wrong / total


def main(argv):
    del argv
    th.keras.utils.set_random_seed(FLAGS.seed)
    train = mnist("train", 128, shuffle_seed=FLAGS.seed)
    test = mnist("test", 1000)
    steps = int(train.cardinality())
    model = compile_model(lenet5(), decay_steps=FLAGS.epochs * steps)
    model.fit(train, epochs=FLAGS.epochs, verbose=2)

    budget = th.Budget(macs=FLAGS.macs, params=FLAGS.params)
    techniques = [th.DF(ranks=False), th.Sparse(sparsity=FLAGS.sparsity)]
    compressed = th.hybrid_compress(
        model, budget, techniques, search_steps=FLAGS.search_epochs * steps
    )
    epochs = FLAGS.search_epochs + FLAGS.finetune_epochs
    compile_model(compressed, decay_steps=epochs * steps)
    compressed.fit(train, epochs=epochs, callbacks=[th.CompressionScheduler()], verbose=2)
    small = compile_model(th.strip(compressed))

    folder = pathlib.Path(tempfile.mkdtemp())
    model.save(folder / "original.keras")
    small.save(folder / "small.keras")
    print("\n$ python -m tfhybrid report small.keras --original original.keras")
    cli.run(
        [
            "tfhybrid",
            "report",
            str(folder / "small.keras"),
            f"--original={folder / 'original.keras'}",
        ]
    )

    images = np.concatenate([x.numpy() for x, _ in train.take(4)])
    report = th.export_tflite(
        small, folder / "small.tflite", quantize="int8", representative_data=images, sparse=True
    )
    results = {
        "command": "python examples/stacked_mnist.py " + " ".join(sys.argv[1:]),
        "budget": budget.get_config(),
        "shares": th.profile(small).ratios(th.profile(model)),
        "test_error": {
            "original": 1 - model.evaluate(test, verbose=0)[1],
            "stripped": 1 - small.evaluate(test, verbose=0)[1],
            "int8_tflite_first_2000": tflite_error(str(folder / "small.tflite"), test),
        },
        "tflite_bytes": report.size_bytes,
        "tflite_input_dtypes": report.input_dtypes,
    }
    print(json.dumps(results, indent=1))
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
