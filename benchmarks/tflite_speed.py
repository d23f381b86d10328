"""Does structured compression make the `.tflite` file faster? LiteRT, measured.

    python benchmarks/tflite_speed.py --runs=50

Models: LeNet-5 (trained on MNIST), its hybrid-compressed, stripped version (DF at
--lenet_budget of the MACs) and its TF-MOT 80%-sparse version (the case the sparse
encoding is for), and MobileNetV2 at 224 x 224 with 50% and 75%
of every prunable channel group removed (L1 norm; random weights: latency does not
depend on them), also with kept channel counts rounded up to multiples of 8 (`_r8`),
which int8 SIMD kernels favour. For each: MACs, params, `.tflite` bytes (fp32, int8, int8 with
sparse encoding), LiteRT latency with 1 thread (median of --runs, rounds
interleaved across models so drift hits all alike), and the measured speed-up
divided by the MAC reduction (1.0 = the speed-up the MACs promise). Writes
tflite_speed.json under --out.
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, mnist  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid.techniques import magnitude  # noqa: E402

keras = th.keras
FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 50, "Timed inferences per model and format (over all rounds).")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds the runs are split into.")
flags.DEFINE_float("lenet_budget", 0.1, "MAC budget of the hybrid-compressed LeNet-5.")
flags.DEFINE_integer("lenet_epochs", 1, "Epochs of LeNet-5 pretraining, search and fine-tuning.")
flags.DEFINE_integer("calibration", 50, "Representative inputs for int8.")
flags.DEFINE_string("out", "benchmarks/results", "Folder for tflite_speed.json.")

FORMATS = {
    "fp32": {"quantize": "none"},
    "int8": {"quantize": "int8"},
    "int8_sparse": {"quantize": "int8", "sparse": True},
}
TIMED = ("fp32", "int8", "int8_sparse")
COMPARED = ("fp32", "int8")  # the formats whose speed-up is set against the MAC reduction


def lenet_family() -> tuple[dict, np.ndarray]:
    """LeNet-5 trained on MNIST, its stripped DF-compressed version, and TF-MOT's 80%
    unstructured pruning of it (zeros only: dense MACs); MNIST inputs."""
    train = mnist("train", 128, shuffle_seed=0)
    epochs = FLAGS.lenet_epochs
    model = compile_model(lenet5())
    model.fit(train, epochs=epochs, verbose=0)
    steps = int(train.cardinality())
    compressed = compile_model(
        th.hybrid_compress(model, th.Budget(macs=FLAGS.lenet_budget), search_steps=epochs * steps)
    )
    compressed.fit(train, epochs=2 * epochs, verbose=0, callbacks=[th.CompressionScheduler()])
    images = np.concatenate([x for x, _ in train.take(2).as_numpy_iterator()])
    return {
        "lenet5": model,
        "lenet5_hybrid": th.strip(compressed),
        "lenet5_tfmot80": tfmot_pruned(model, train, 0.8),
    }, images


def tfmot_pruned(model, train, sparsity: float):
    start = keras.models.clone_model(model)
    start.set_weights(model.get_weights())
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, 0, frequency=100)
    pruned = compile_model(tfmot.sparsity.keras.prune_low_magnitude(start, schedule))
    pruned.fit(
        train,
        epochs=FLAGS.lenet_epochs,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    return tfmot.sparsity.keras.strip_pruning(pruned)


def mobilenet_family() -> tuple[dict, np.ndarray]:
    """MobileNetV2 (224) and copies with 50% / 75% of each prunable group removed,
    as is and with the kept counts rounded up to multiples of 8 (`_r8`)."""
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(224, 224, 3), classifier_activation=None
    )
    models = {"mobilenet_v2": model}
    for share in (0.5, 0.75):
        for round_to in (1, 8):
            name = f"mobilenet_v2_pruned{int(share * 100)}" + ("_r8" if round_to == 8 else "")
            models[name] = th.prune_channels(model, magnitude.l1_removal(model, share, round_to))
    inputs = np.random.default_rng(0).uniform(-1, 1, (FLAGS.calibration, 224, 224, 3))
    return models, inputs.astype(np.float32)


def exported(models: dict, inputs: np.ndarray, folder: pathlib.Path) -> dict:
    """Every model in every format: sizes, op counts and agreement with Keras."""
    rows = {}
    for name, model in models.items():
        prof = th.profile(model)
        row = rows[name] = {"macs": prof.macs, "params": prof.params, "files": {}}
        for fmt, options in FORMATS.items():
            report = th.export_tflite(
                model,
                folder / f"{name}_{fmt}.tflite",
                representative_data=inputs,
                samples=FLAGS.calibration,
                **options,
            )
            row["files"][fmt] = {"bytes": report.size_bytes, "check": report.check}
            print(name, fmt, report.size_bytes, json.dumps(report.check), flush=True)
    return rows


def timed(rows: dict, folder: pathlib.Path) -> None:
    """Median 1-thread latency per model and timed format, rounds interleaved."""
    samples: dict = {}
    per_round = max(1, FLAGS.runs // FLAGS.rounds)
    for _ in range(FLAGS.rounds):
        for name in rows:
            for fmt in TIMED:
                timing = th.benchmark_tflite(
                    folder / f"{name}_{fmt}.tflite", threads=1, runs=per_round
                )
                samples.setdefault((name, fmt), []).append(timing["median_ms"])
                rows[name]["files"][fmt]["kernels"] = timing["kernels"]
    for (name, fmt), medians in samples.items():
        rows[name]["files"][fmt]["latency_ms"] = statistics.median(medians)


def speedups(rows: dict, baseline: str, family: list[str]) -> None:
    """Speed-up over the baseline and its ratio to the MAC reduction, per timed format."""
    base = rows[baseline]
    for name in family:
        row = rows[name]
        row["mac_reduction"] = base["macs"] / row["macs"]
        for fmt in COMPARED:
            speedup = base["files"][fmt]["latency_ms"] / row["files"][fmt]["latency_ms"]
            row["files"][fmt]["speedup"] = speedup
            row["files"][fmt]["speedup_over_mac_reduction"] = speedup / row["mac_reduction"]


def table(rows: dict) -> str:
    head = (
        "| model | MACs | params | fp32 bytes | int8 bytes | int8+sparse bytes | fp32 ms | "
        "int8 ms | int8+sparse ms | MAC reduction | fp32 speed-up (÷ MACs) | "
        "int8 speed-up (÷ MACs) |"
    )
    lines = [head, "|" + "---|" * 12]
    for name, row in rows.items():
        files = row["files"]
        lines.append(
            f"| {name} | {row['macs']:,} | {row['params']:,} | {files['fp32']['bytes']:,} | "
            f"{files['int8']['bytes']:,} | {files['int8_sparse']['bytes']:,} | "
            + " | ".join(f"{files[f]['latency_ms']:.3f}" for f in TIMED)
            + f" | {row['mac_reduction']:.2f}x | "
            + " | ".join(
                f"{files[f]['speedup']:.2f}x ({files[f]['speedup_over_mac_reduction']:.2f})"
                for f in COMPARED
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        lenets, digits = lenet_family()
        mobilenets, images = mobilenet_family()
        rows = {**exported(lenets, digits, folder), **exported(mobilenets, images, folder)}
        timed(rows, folder)
    speedups(rows, "lenet5", list(lenets))
    speedups(rows, "mobilenet_v2", list(mobilenets))
    command = (
        f"python benchmarks/tflite_speed.py --runs={FLAGS.runs} --rounds={FLAGS.rounds} "
        f"--lenet_budget={FLAGS.lenet_budget} --lenet_epochs={FLAGS.lenet_epochs}"
    )
    (out / "tflite_speed.json").write_text(
        json.dumps({"command": command, "results": rows}, indent=2)
    )
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
