"""LC on MNIST: the LC toolkit's LeNet-300-100 compressions, by `th.LC` inside `fit`.

    python benchmarks/lc_mnist.py --model=lenet_300_100 --seeds=0,1,2 \
        --search_epochs=20 --fit_epochs=24 --out=docs/results/lc_mnist.json

From the same pretrained network per seed (Adam, cosine-decayed rate), each method runs
`--search_epochs` L steps (an epoch each, a C step after each, μ rising from `--mu` start
to end) inside `--fit_epochs` (the rest: the compressed kernels fixed, biases trained):
  quantize_k2        every layer quantized to its own codebook of 2 values
  prune_5            5% of all the weights kept (one budget for every layer)
  quantize_k2_prune_1  one 2-value codebook for all layers plus 1% of all weights as floats
  rank_selection     every layer's rank chosen by LC's rank selection (`--alpha`)
The toolkit's published LeNet-300-100 errors (reference 2.13%): quantize_k2 2.56%,
prune_5 2.18%, quantize_k2_prune_1 2.17%, rank_selection 1.90%. Each run reports test
error, the bits LC counts (a share of float32 storage) and those `th.profile` measures on
the stripped model.
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
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, lenet_300_100, mnist, pretrained  # noqa: E402
from unify_export import files_of, files_table  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid.techniques.lc import DEFAULT_MU  # noqa: E402

keras = th.keras
METHODS = ["quantize_k2", "prune_5", "quantize_k2_prune_1", "rank_selection"]
MODELS = {"lenet5": lenet5, "lenet_300_100": lenet_300_100}
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run, so tests can import the table)."""
    flags.DEFINE_enum("model", "lenet_300_100", list(MODELS), "The network.")
    flags.DEFINE_list("methods", METHODS, f"Methods, of {METHODS}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each pretrains its own network).")
    flags.DEFINE_integer("pretrain_epochs", 10, "Epochs of the original model.")
    flags.DEFINE_integer("search_epochs", 20, "L steps (epochs), a C step after each.")
    flags.DEFINE_integer("fit_epochs", 24, "Epochs of the compressed fit (search + rest).")
    flags.DEFINE_list("mu", [str(m) for m in DEFAULT_MU], "μ's start and end over the search.")
    flags.DEFINE_float("alpha", 1e-6, "Rank selection's weight of a rank's storage.")
    flags.DEFINE_enum(
        "optimizer",
        "adam",
        ["adam", "sgd"],
        "The compressed fit's optimizer: Adam(1e-3) or "
        "SGD(0.05, momentum 0.9, Nesterov), each decayed along a cosine over the fit.",
    )
    flags.DEFINE_integer("train_batches", 0, "Use only this many training batches (0: all).")
    flags.DEFINE_integer(
        "export_runs", 0, "With > 0: per seed-0 model, its files' sizes and LiteRT latency."
    )
    flags.DEFINE_string("out", "docs/results/lc_mnist.json", "Result JSON.")
    flags.DEFINE_list("from_json", [], "Only print the table of these result JSONs (merged).")


def parts(method: str, model) -> dict:
    """The LC parts of `method` on `model`'s Dense and Conv2D layers."""
    kinds = (keras.layers.Dense, keras.layers.Conv2D)
    names = [layer.name for layer in model.layers if type(layer) in kinds]
    if method == "prune_5":
        return {tuple(names): th.Prune(keep=0.05)}
    if method == "quantize_k2_prune_1":
        return {tuple(names): th.Quantize(2) + th.Prune(keep=0.01)}
    each = {
        "quantize_k2": lambda: th.Quantize(2),
        "rank_selection": lambda: th.LowRank(alpha=FLAGS.alpha),
    }[method]
    return {name: each() for name in names}


def run_one(method: str, base, train, test, steps: int, export: bool) -> dict:
    technique = th.LC(parts(method, base), mu=tuple(float(m) for m in FLAGS.mu))
    search = FLAGS.search_epochs * steps
    compressed = th.hybrid_compress(base, th.Budget(bits=1.0), [technique], search_steps=search)
    compile_for_fit(compressed, decay_steps=FLAGS.fit_epochs * steps)
    start = time.perf_counter()
    compressed.fit(train, epochs=FLAGS.fit_epochs, callbacks=[th.CompressionScheduler()], verbose=0)
    seconds = time.perf_counter() - start
    small = compile_model(th.strip(compressed))
    original = th.profile(base)
    entry = {
        "test_error": 1 - small.evaluate(test, verbose=0)[1],
        "counted_bits_ratio": float(compressed.ratios(hard=True)["bits"]),
        "measured_bits_ratio": th.profile(small).bits / (32 * original.params),
        "fit_seconds": seconds,
    }
    if export:
        entry["files"] = exported(small, test)
    return entry


def compile_for_fit(model, decay_steps: int):
    """Compiles `model` with `--optimizer`, its rate decayed to 0 over `decay_steps`."""
    if FLAGS.optimizer == "adam":
        return compile_model(model, decay_steps=decay_steps)
    rate = keras.optimizers.schedules.CosineDecay(0.05, decay_steps)
    model.compile(
        optimizer=keras.optimizers.SGD(rate, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def exported(model, test) -> dict:
    """Sizes of `model`'s compact file and `.tflite` files, and their LiteRT latency."""
    representative = test.unbatch().map(lambda x, y: x).batch(1).take(100)
    with tempfile.TemporaryDirectory() as folder:
        return files_of(model, None, representative, folder, FLAGS.export_runs)


def main(argv):
    del argv
    if FLAGS.from_json:
        runs = [r for p in FLAGS.from_json for r in json.loads(pathlib.Path(p).read_text())["runs"]]
        print("\n".join(table(runs) + [""] + files_table_of(runs)))
        return
    test = mnist("test", 1000)
    runs = []
    for seed in map(int, FLAGS.seeds):
        model = MODELS[FLAGS.model]
        base, train, steps = pretrained(model, seed, FLAGS.pretrain_epochs, FLAGS.train_batches)
        error = 1 - base.evaluate(test, verbose=0)[1]
        export = FLAGS.export_runs > 0 and seed == int(FLAGS.seeds[0])
        runs.append({"method": "original", "seed": seed, "test_error": error})
        if export:
            runs[-1]["files"] = exported(base, test)
        for method in FLAGS.methods:
            keras.utils.set_random_seed(seed)
            entry = {"method": method, "seed": seed, "model": FLAGS.model}
            entry["optimizer"] = FLAGS.optimizer
            entry.update(run_one(method, base, train, test, steps, export))
            runs.append(entry)
            print(json.dumps(entry), flush=True)
            out = pathlib.Path(FLAGS.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            command = "python benchmarks/lc_mnist.py " + " ".join(sys.argv[1:])
            out.write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    print("\n".join(table(runs) + [""] + files_table_of(runs)))


def files_table_of(runs: list[dict]) -> list[str]:
    """Markdown: per exported model, its test error, measured bits, compact file bytes and
    per `.tflite` variant its bytes, gzipped bytes and LiteRT median latency."""
    models = {
        r["method"]: {**r["files"], "test_error": r["test_error"]} for r in runs if "files" in r
    }

    def cells(r: dict) -> list[str]:
        return [f"{100 * r['test_error']:.2f}", f"{r['bits']:,}", f"{r['compact_bytes']:,}"]

    columns = ["model", "test error %", "bits measured", "compact bytes"]
    return files_table(models, columns, cells) if models else []


def table(runs: list[dict]) -> list[str]:
    """Markdown rows: per method, the mean test error (%) over seeds, its range, and the
    mean bits LC counted and `th.profile` measured (shares of float32 storage)."""
    lines = [
        "| method | seeds | test error % (range) | bits counted | bits measured |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        errors = [100 * r["test_error"] for r in mine]
        bits = [
            f"{statistics.mean(r[k] for r in mine):.4f}" if k in mine[0] else "-"
            for k in ("counted_bits_ratio", "measured_bits_ratio")
        ]
        lines.append(
            f"| {method} | {len(mine)} | {statistics.mean(errors):.2f} "
            f"({min(errors):.2f}-{max(errors):.2f}) | " + " | ".join(bits) + " |"
        )
    return lines


if __name__ == "__main__":
    define_flags()
    app.run(main)
