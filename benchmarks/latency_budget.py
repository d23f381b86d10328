"""A latency budget measured in LiteRT against a MAC budget.

    python benchmarks/latency_budget.py --part=predict --out=docs/results/latency_budget
    python benchmarks/latency_budget.py --part=train --seeds=0,1 \
        --out=docs/results/latency_budget

`--part=predict` (MobileNetV2, --size x --size, random weights: latency does not depend
on them): measures its latency table (`measure_latency_table`, float32 and int8, 1
thread) and checks what the table predicts against what LiteRT measures, for
(a) copies with a share of every prunable group's channels removed (L1 norm), and (b) the
models a search's budget projection gives under `Budget(latency=...)` and under
`Budget(macs=...)` (no training: `finish_search` alone). Every model is exported and timed
whole `--repeats` times (median of `--runs` each; the spread is the run-to-run noise).

`--part=train` (LeNet-5 on MNIST, TFDS): pretrains, measures the int8 table, then for
each MAC budget and each latency budget: search (`--search_epochs`), fine-tune inside
the fit (`--fit_epochs` in all), strip, fine-tune (`--finetune_epochs`, rate decayed),
export int8 and time it. Test error against measured int8 latency, for both budgets.

Writes latency_budget_<part>.json (and the tables) under --out.
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, mnist, pretrained  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid import channels, cost  # noqa: E402
from tfhybrid.techniques import magnitude  # noqa: E402

keras = th.keras
FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "predict", ["predict", "train"], "Which experiment.")
flags.DEFINE_integer("size", 96, "predict: MobileNetV2's input height and width.")
flags.DEFINE_list("formats", ["int8", "fp32"], "predict: the formats to time.")
flags.DEFINE_list("shares", ["0.25", "0.5", "0.75"], "predict: shares of channels removed.")
flags.DEFINE_list("latency_budgets", ["0.5", "0.7"], "Latency budgets (shares).")
flags.DEFINE_list("mac_budgets", ["0.25", "0.5"], "MAC budgets (shares).")
flags.DEFINE_integer("runs", 100, "Timed inferences per whole-model timing.")
flags.DEFINE_integer("table_runs", 30, "Timed inferences per operator in the table.")
flags.DEFINE_integer("repeats", 3, "Whole-model timings per model (the noise).")
flags.DEFINE_list("seeds", ["0"], "train: seeds.")
flags.DEFINE_integer("pretrain_epochs", 3, "train: epochs of the uncompressed network.")
flags.DEFINE_integer("search_epochs", 2, "train: epochs of search inside the fit.")
flags.DEFINE_integer("fit_epochs", 4, "train: epochs of the compression fit in all.")
flags.DEFINE_integer("finetune_epochs", 2, "train: epochs after strip.")
flags.DEFINE_string("out", "benchmarks/results", "Folder for the JSON and the tables.")
flags.DEFINE_list("from_json", [], "train: print the table of these result files, run nothing.")

FORMATS = {"fp32": "none", "int8": "int8"}


def timed(model, name: str, quantize: str, scratch: pathlib.Path, calibration) -> dict:
    """`model` exported (int8 calibrated on `calibration`) and timed --repeats times."""
    path = scratch / f"{name}_{quantize}.tflite"
    th.export_tflite(
        model,
        path,
        quantize=quantize,
        representative_data=calibration,
        samples=len(calibration),
    )
    medians = [
        th.benchmark_tflite(path, runs=FLAGS.runs)["median_ms"] for _ in range(FLAGS.repeats)
    ]
    return {"median_ms": statistics.median(medians), "min_ms": min(medians), "max_ms": max(medians)}


def predicted_ratio(cost_model: cost.CostModel, counts: dict, ranks: dict | None = None) -> float:
    costs, full = cost_model.costs(counts, ranks), cost_model.costs()
    return float(costs["latency"] / full["latency"])


def predict_part(scratch: pathlib.Path, folder: pathlib.Path) -> dict:
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(FLAGS.size, FLAGS.size, 3), classifier_activation=None
    )
    calibration = np.random.default_rng(0).uniform(-1, 1, (16, FLAGS.size, FLAGS.size, 3))
    calibration = calibration.astype(np.float32)
    analysis = channels.analyze(model)
    results = {"model": f"MobileNetV2 {FLAGS.size}x{FLAGS.size}", "formats": {}}
    for fmt in FLAGS.formats:
        quantize = FORMATS[fmt]
        start = time.time()
        table = th.measure_latency_table(model, quantize, runs=FLAGS.table_runs)
        table.save(folder / f"mobilenet_v2_{FLAGS.size}_{fmt}.latency.json")
        seconds = time.time() - start
        cost_model = cost.CostModel.from_analysis(analysis).with_latency(table)
        base = timed(model, "original", quantize, scratch, calibration)
        base["macs"] = th.profile(model).macs
        rows = {"table_seconds": seconds, "whole_ms": table.whole_ms, "rest_ms": table.rest_ms}
        rows["original"] = base
        for share in map(float, FLAGS.shares):
            removal = magnitude.l1_removal(model, share)
            counts = {gid: analysis.groups[gid].size - len(r) for gid, r in removal.items()}
            small = th.prune_channels(model, removal)
            rows[f"l1_{share}"] = measured_row(small, base, quantize, scratch, calibration)
            rows[f"l1_{share}"]["predicted_ratio"] = predicted_ratio(cost_model, counts)
        budgets = [("latency", float(b)) for b in FLAGS.latency_budgets]
        budgets += [("macs", float(b)) for b in FLAGS.mac_budgets]
        for kind, share in budgets:
            budget = th.Budget(**{kind: share}, latency_table=table)
            compressed = th.hybrid_compress(model, budget)
            compressed.finish_search()
            predicted = float(compressed.ratios(hard=True)["latency"])
            small = th.strip(compressed)
            rows[f"{kind}_{share}"] = measured_row(small, base, quantize, scratch, calibration)
            rows[f"{kind}_{share}"]["predicted_ratio"] = predicted
        results["formats"][fmt] = rows
        print(json.dumps({fmt: rows}, indent=1), flush=True)
    return results


def measured_row(small, base: dict, quantize: str, scratch, calibration) -> dict:
    """The model's measured latency over the original's, and its MAC ratio."""
    timing = timed(small, "small", quantize, scratch, calibration)
    return {
        "measured_ratio": timing["median_ms"] / base["median_ms"],
        "measured_ratio_range": [
            timing["min_ms"] / base["max_ms"],
            timing["max_ms"] / base["min_ms"],
        ],
        "ms": timing,
        "mac_ratio": th.profile(small).macs / base["macs"],
    }


def train_part(scratch: pathlib.Path, folder: pathlib.Path) -> dict:
    test = mnist("test", 256)
    images = next(iter(mnist("train", 100).take(1)))[0].numpy()
    results = {"model": "LeNet-5 on MNIST", "runs": []}
    for seed in map(int, FLAGS.seeds):
        model, train, steps = pretrained(lenet5, seed, FLAGS.pretrain_epochs)
        original_error = 1 - model.evaluate(test, verbose=0)[1]
        for fmt in FLAGS.formats:
            quantize = FORMATS[fmt]
            table = th.measure_latency_table(
                model, quantize, representative_data=images, runs=FLAGS.table_runs
            )
            table.save(folder / f"lenet5_seed{seed}_{fmt}.latency.json")
            base = timed(model, "original", quantize, scratch, images)
            base["macs"] = th.profile(model).macs
            budgets = [("latency", float(b)) for b in FLAGS.latency_budgets]
            budgets += [("macs", float(b)) for b in FLAGS.mac_budgets]
            for kind, share in budgets:
                row = {"seed": seed, "format": fmt, "budget": kind, "share": share}
                row["original_test_error"] = original_error
                row.update(
                    compressed_run(
                        model, th.Budget(**{kind: share}, latency_table=table), train, steps, seed
                    )
                )
                small = row.pop("model")
                row["test_error"] = 1 - small.evaluate(test, verbose=0)[1]
                row.update(measured_row(small, base, quantize, scratch, images))
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    return results


def compressed_run(model, budget, train, steps: int, seed: int) -> dict:
    """Search, strip and fine-tune under `budget`; the stripped model and the latency
    ratio the table predicts for it."""
    keras.utils.set_random_seed(seed)
    compressed = th.hybrid_compress(model, budget, search_steps=FLAGS.search_epochs * steps)
    compile_model(compressed)
    callbacks = [th.CompressionScheduler()]
    compressed.fit(train, epochs=FLAGS.fit_epochs, callbacks=callbacks, verbose=0)
    predicted = float(compressed.ratios(hard=True)["latency"])
    small = compile_model(th.strip(compressed), decay_steps=FLAGS.finetune_epochs * steps)
    small.fit(train, epochs=FLAGS.finetune_epochs, verbose=0)
    return {"model": small, "predicted_ratio": predicted}


def train_table(paths: list[str]) -> str:
    """The train part's results as a markdown table: per format and budget, means over
    seeds (the ranges in brackets)."""
    runs = [row for path in paths for row in json.loads(pathlib.Path(path).read_text())["runs"]]
    groups: dict = {}
    for row in runs:
        groups.setdefault((row["format"], row["budget"], row["share"]), []).append(row)
    lines = [
        "| format | budget | seeds | test error % | latency predicted | latency measured | MACs |",
        "|---|---|---|---|---|---|---|",
    ]
    for (fmt, kind, share), rows in sorted(groups.items()):
        cells = [
            _spread([100 * r["test_error"] for r in rows], 2),
            _spread([r["predicted_ratio"] for r in rows], 3),
            _spread([r["measured_ratio"] for r in rows], 3),
            _spread([r["mac_ratio"] for r in rows], 3),
        ]
        lines.append(f"| {fmt} | {kind}={share} | {len(rows)} | " + " | ".join(cells) + " |")
    originals = {r["seed"]: r["original_test_error"] for r in runs}
    lines.append("")
    lines.append(
        f"Uncompressed: {_spread([100 * e for e in originals.values()], 2)}% test error "
        f"({len(originals)} networks)."
    )
    return "\n".join(lines)


def _spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv):
    del argv
    if FLAGS.from_json:
        print(train_table(FLAGS.from_json))
        return
    folder = pathlib.Path(FLAGS.out)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if FLAGS.part == "predict":
            results = predict_part(pathlib.Path(scratch), folder)
        else:
            results = train_part(pathlib.Path(scratch), folder)
    (folder / f"latency_budget_{FLAGS.part}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
