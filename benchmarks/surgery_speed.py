"""How long channel analysis and surgery take on large real architectures.

    python benchmarks/surgery_speed.py --runs=5 --size=224

For ResNet50, DenseNet121 and EfficientNetB0 (tf_keras.applications, weights=None)
it times, in one run and as medians: `channel_groups`, `prune_channels` removing 25%
of every prunable group (physical and masked), and Keras's own `clone_model` as the
baseline cost of rebuilding the same model (with its weights). Writes JSON and a PNG under
benchmarks/results/.
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

import tfhybrid as th  # noqa: E402

keras = th.keras

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 5, "Timed runs per measurement (the median is reported).")
flags.DEFINE_integer("size", 224, "Input height and width.")
flags.DEFINE_string("out", "benchmarks/results", "Folder for surgery_speed.json/.png.")

ARCHITECTURES = {
    "ResNet50": keras.applications.ResNet50,
    "DenseNet121": keras.applications.DenseNet121,
    "EfficientNetB0": keras.applications.EfficientNetB0,
}


def median_seconds(fn, runs: int) -> float:
    """Median wall time of `fn()` over `runs` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def keras_copy(model):
    """Keras's own way to rebuild a model with its weights: the baseline."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def quarter_of_every_group(model) -> dict:
    rng = np.random.default_rng(0)
    return {
        g.id: rng.choice(g.size, g.size // 4, replace=False)
        for g in th.channel_groups(model)
        if g.prunable and g.size >= 4
    }


def measure(name: str, runs: int, size: int) -> dict:
    model = ARCHITECTURES[name](weights=None, input_shape=(size, size, 3))
    remove = quarter_of_every_group(model)
    pruned = th.prune_channels(model, remove)
    groups = th.channel_groups(model)
    return {
        "layers": len(model.layers),
        "groups": len(groups),
        "prunable_groups": sum(g.prunable for g in groups),
        "macs": th.profile(model).macs,
        "macs_after_25pct_removal": th.profile(pruned).macs,
        "params": model.count_params(),
        "params_after_25pct_removal": pruned.count_params(),
        "seconds": {
            "keras_clone_model": median_seconds(lambda: keras_copy(model), runs),
            "channel_groups": median_seconds(lambda: th.channel_groups(model), runs),
            "prune_channels": median_seconds(lambda: th.prune_channels(model, remove), runs),
            "prune_channels_masked": median_seconds(
                lambda: th.prune_channels(model, remove, masked=True), runs
            ),
        },
    }


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(next(iter(results.values()))["seconds"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(steps)
    for i, step in enumerate(steps):
        values = [r["seconds"][step] for r in results.values()]
        ax.bar(np.arange(len(results)) + i * width, values, width, label=step)
    ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, list(results))
    ax.set_ylabel("seconds (median)")
    ax.set_title("tfhybrid surgery time vs keras.models.clone_model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    results = {name: measure(name, FLAGS.runs, FLAGS.size) for name in ARCHITECTURES}
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": f"python benchmarks/surgery_speed.py --runs={FLAGS.runs} --size={FLAGS.size}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}",
        "results": results,
    }
    (out / "surgery_speed.json").write_text(json.dumps(record, indent=2))
    plot(results, out / "surgery_speed.png")
    print(
        f"{'model':16}{'layers':>7}{'groups':>8}"
        + "".join(f"{s:>24}" for s in next(iter(results.values()))["seconds"])
    )
    for name, r in results.items():
        print(
            f"{name:16}{r['layers']:>7}{r['groups']:>8}"
            + "".join(f"{v:>23.3f}s" for v in r["seconds"].values())
        )


if __name__ == "__main__":
    app.run(main)
