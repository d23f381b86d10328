"""How long a DF search takes to start on large real architectures.

    python benchmarks/search_startup.py --models=DenseNet121,ResNet50,MobileNetV2

The first training step of a Keras model traces its graph (twice: the optimizer
creates its slots in the first trace). A search adds masks, factored layers and
the budget to that graph, so its first step costs more than a plain model's. For
each `tf_keras.applications` model (weights=None, small inputs: tracing does not
depend on the image size), in one run: `hybrid_compress` (building the search
model), then the wall time of the first and the median of later `fit` steps,
for the plain model and its search (filters and ranks, MAC budget 0.5). Writes
benchmarks/results/search_startup.json.
"""

import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import StepTimer  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["DenseNet121", "ResNet50", "MobileNetV2"], "applications to time.")
flags.DEFINE_integer("size", 32, "Input height and width.")
flags.DEFINE_integer("steps", 6, "Training steps timed per model.")
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_string("out", "benchmarks/results", "Folder for search_startup.json.")


def fit_times(model, x, y, callbacks=()) -> dict:
    """Seconds of the first training step, median seconds of the later ones, and
    seconds of the whole `fit` (with what it does before its first step)."""
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(x, y, batch_size=FLAGS.batch, epochs=1, verbose=0, callbacks=[*callbacks, timer])
    return {
        "first_step_s": timer.times[0],
        "later_step_s": statistics.median(timer.times[1:]),
        "fit_s": time.perf_counter() - start,
    }


def measure(name: str) -> dict:
    """Plain and search start-up times of one application."""
    application = getattr(keras.applications, name)
    shape = (FLAGS.size, FLAGS.size, 3)

    def build():
        return application(weights=None, input_shape=shape, classes=10, classifier_activation=None)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batch * FLAGS.steps, *shape)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    plain = fit_times(build(), x, y)
    start = time.perf_counter()
    compressed = th.hybrid_compress(
        build(),
        th.Budget(macs=0.5),
        search_steps=10 * FLAGS.steps,
    )
    built = time.perf_counter() - start
    search = fit_times(compressed, x, y, [th.CompressionScheduler()])
    return {
        "plain": plain,
        "search": {"hybrid_compress_s": built, **search},
        "first_step_ratio": search["first_step_s"] / plain["first_step_s"],
        "fit_ratio": search["fit_s"] / plain["fit_s"],
    }


def warm_up() -> None:
    """One tiny fit, so that the first model timed does not also pay TF's start-up."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    fit_times(
        model, np.zeros((2 * FLAGS.batch, 4), np.float32), np.zeros(2 * FLAGS.batch, np.int64)
    )


def main(argv):
    del argv
    warm_up()
    results = {}
    for name in FLAGS.models:
        results[name] = measure(name)
        keras.backend.clear_session()
        print(name, json.dumps(results[name]), flush=True)
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/search_startup.py "
        f"--models={','.join(FLAGS.models)} --size={FLAGS.size} --steps={FLAGS.steps} "
        f"--batch={FLAGS.batch}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}",
        "results": results,
    }
    (out / "search_startup.json").write_text(json.dumps(record, indent=1))
    print(
        "| model | plain: first step | plain: later steps | search: hybrid_compress | "
        "search: first step | search: later steps | first step, search ÷ plain | "
        "whole fit, search ÷ plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p, s = r["plain"], r["search"]
        print(
            f"| {name} | {p['first_step_s']:.1f} s | {1000 * p['later_step_s']:.0f} ms | "
            f"{s['hybrid_compress_s']:.1f} s | {s['first_step_s']:.1f} s | "
            f"{1000 * s['later_step_s']:.0f} ms | {r['first_step_ratio']:.1f}× | "
            f"{r['fit_ratio']:.1f}× |"
        )


if __name__ == "__main__":
    app.run(main)
