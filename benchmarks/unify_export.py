"""What a Unify model's files weigh and how fast LiteRT runs them, next to the dense model.

    python benchmarks/unify_export.py --bits=0.0625 --out=docs/results/unify_export.json

LeNet-5 is pretrained on MNIST, then compressed by each method of
`benchmarks/unify_mnist.py` (`--methods`) to `--bits` of its float32 storage and stripped.
For it and for the dense original: the counted bits, the compact file
(`th.save_compact`), the `.tflite` files (float and int8, each with and without the
converter's sparse encoding) and their gzipped sizes, and the LiteRT latency of each
`.tflite` (median of `--runs`, 1 thread, XNNPACK or the built-in kernels as LiteRT
chooses). All in one process, side by side.
"""

import gzip
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, mnist  # noqa: E402
from unify_mnist import techniques  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras
FLAGS = flags.FLAGS
VARIANTS = {  # name -> (quantize, sparse)
    "float": ("none", False),
    "float_sparse": ("none", True),
    "int8": ("int8", False),
    "int8_sparse": ("int8", True),
}


def define_flags() -> None:
    """The command line (defined only when run, so tests can import the table)."""
    flags.DEFINE_float("bits", 0.0625, "Bits budget (share of float32 storage).")
    flags.DEFINE_list("methods", ["unify", "prune", "both"], "unify_mnist.py's Unify methods.")
    flags.DEFINE_integer("pretrain_epochs", 4, "Epochs of the original model.")
    flags.DEFINE_integer("search_epochs", 2, "Epochs of search inside the fit.")
    flags.DEFINE_integer("fit_epochs", 4, "Epochs of the compressed fit.")
    flags.DEFINE_integer("runs", 200, "Timed LiteRT inferences per file.")
    flags.DEFINE_integer("train_batches", 0, "Use only this many training batches (0: all).")
    flags.DEFINE_string("out", "docs/results/unify_export.json", "Result JSON.")
    flags.DEFINE_list("from_json", [], "Only print the table of this result JSON.")


def files_of(model, block, representative, folder: str, runs: int) -> dict:
    """Sizes (and latency, the median of `runs`) of every file of `model`."""
    figures = {"bits": th.profile(model, block=block).bits}
    report = th.save_compact(model, os.path.join(folder, "m.thc"), block=block)
    figures["compact_bytes"] = report.size_bytes
    figures["compact_payload_bytes"] = report.payload_bytes
    for name, (quantize, sparse) in VARIANTS.items():
        path = os.path.join(folder, f"{name}.tflite")
        report = th.export_tflite(
            model, path, quantize=quantize, representative_data=representative, sparse=sparse
        )
        content = pathlib.Path(path).read_bytes()
        timing = th.benchmark_tflite(path, threads=1, runs=runs)
        figures[name] = {
            "bytes": len(content),
            "gzip_bytes": len(gzip.compress(content, 9)),
            "median_ms": timing["median_ms"],
            "kernels": timing["kernels"],
            "top1_agreement": report.check["top1_agreement"],
        }
    return figures


def main(argv):
    del argv
    if FLAGS.from_json:
        print("\n".join(table(json.loads(pathlib.Path(FLAGS.from_json[0]).read_text()))))
        return
    keras.utils.set_random_seed(0)
    train, test = mnist("train", 128, shuffle_seed=0), mnist("test", 1000)
    if FLAGS.train_batches:
        train = train.take(FLAGS.train_batches)
    steps = int(train.cardinality())
    base = compile_model(lenet5(), decay_steps=FLAGS.pretrain_epochs * steps)
    base.fit(train, epochs=FLAGS.pretrain_epochs, verbose=0)
    representative = test.unbatch().map(lambda x, y: x).batch(1).take(100)
    results = {"command": "python benchmarks/unify_export.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as folder:
        results["dense"] = files_of(base, None, representative, folder, FLAGS.runs)
        results["dense"]["test_error"] = 1 - base.evaluate(test, verbose=0)[1]
        for method in FLAGS.methods:
            keras.utils.set_random_seed(0)
            chosen, block, budget = techniques(method, FLAGS.bits, base)
            search = FLAGS.search_epochs * steps
            compressed = th.hybrid_compress(base, budget, chosen, search_steps=search)
            compile_model(compressed, decay_steps=FLAGS.fit_epochs * steps)
            compressed.fit(
                train, epochs=FLAGS.fit_epochs, callbacks=[th.CompressionScheduler()], verbose=0
            )
            small = compile_model(th.strip(compressed))
            results[method] = files_of(small, block, representative, folder, FLAGS.runs)
            results[method]["test_error"] = 1 - small.evaluate(test, verbose=0)[1]
            print(method, json.dumps(results[method]), flush=True)
    write_results(results, FLAGS.out, table)


def write_results(results: dict, path: str, table) -> None:
    """Writes `results` as JSON to `path` and prints `table(results)`."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("\n".join(table(results)))


def table(results: dict) -> list[str]:
    """Markdown: per model, test error, bits, compact file, and per .tflite variant its
    bytes, gzipped bytes and LiteRT median latency."""

    def cells(r: dict) -> list[str]:
        compact = f"{r['compact_bytes']:,}" if "compact_bytes" in r else "-"
        return [f"{100 * r['test_error']:.2f}", f"{r['bits']:,}", compact]

    return files_table(results, ["model", "test error %", "counted bits", "compact bytes"], cells)


def files_table(results: dict, first: list[str], cells) -> list[str]:
    """Markdown rows, one per entry of `results` but "command": the columns `first` (the
    entry's name, then what `cells(entry)` gives), then per .tflite variant its bytes,
    gzipped bytes and LiteRT median latency."""
    header = "| " + " | ".join(first) + " |"
    header += "".join(f" {v} bytes (gzip) | {v} ms |" for v in VARIANTS)
    lines = [header, "|---" * (len(first) + 2 * len(VARIANTS)) + "|"]
    for name, r in results.items():
        if name == "command":
            continue
        row = "| " + " | ".join([name, *cells(r)]) + " |"
        for variant in VARIANTS:
            v = r[variant]
            row += f" {v['bytes']:,} ({v['gzip_bytes']:,}) | {v['median_ms']:.3f} |"
        lines.append(row)
    return lines


if __name__ == "__main__":
    define_flags()
    app.run(main)
