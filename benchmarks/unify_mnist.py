"""Storage budgets on MNIST: Unify against TF-MOT clustering and block pruning.

    python benchmarks/unify_mnist.py --model=lenet5 --bits=0.125,0.0625,0.03125 \
        --seeds=0,1,2 --out=docs/results/unify_mnist.json

For every bits budget (share of the float32 storage) and seed, from the same pretrained
network (`--model`: lenet5, lenet_300_100 or residual_cnn, a small ResNet with
BatchNorm) and with the same epochs after it (`--search_epochs` of search inside
`--fit_epochs`, Adam with a cosine-decayed rate), Unify's magnitudes in
`--magnitude_bits`:
  unify        th.Unify(block=(1, n), unify=None, prune=0): the unified share from the
               budget, nothing pruned; n the shortest of 4, 8, ..., 64 whose unified
               blocks store at most 90% of the budget (`unify_block`)
  prune        th.Unify(block=(1, 4), unify=0): whole blocks pruned, the rest float32
  both         th.Unify(block=(1, 4), unify=None, prune=None): blocks unified, then
               pruned, as the budget needs
  cluster      th.Cluster (TF-MOT cluster_weights), 2^bits clusters per kernel
  block_sparse th.Sparse(block_size=(1, 4)) (TF-MOT prune_low_magnitude) on the Dense
               kernels (TF-MOT's blocks take 2-D kernels only; the convolutions stay
               float32), the sparsity that meets the budget with its bitmap
  df_unify     th.DF(ranks=False) + th.Unify(block=(1, 4), unify=None, prune=None)
               under Budget(macs=--df_macs, bits=...) (a rank and unified blocks would
               both change one kernel, which is refused)
A method that cannot reach a budget (a sign bit per weight is 1/32 of float32) is left
out of that budget's row with the reason. Each run reports test error, MACs, the bits
the budget counted and those measured (`th.profile(small, block=...)`, and for Unify
the compact file's size).
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

from absl import app, flags  # noqa: E402
from mnist import (  # noqa: E402
    compile_model,
    lenet5,
    lenet_300_100,
    mnist,
    pretrained,
    residual_cnn,
)

import tfhybrid as th  # noqa: E402
from tfhybrid.techniques.unify import DEFAULT_MAGNITUDE_BITS, DEFAULT_RHO  # noqa: E402

keras = th.keras
METHODS = ["unify", "prune", "both", "cluster", "block_sparse", "df_unify"]
MODELS = {"lenet5": lenet5, "lenet_300_100": lenet_300_100, "residual_cnn": residual_cnn}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run, so tests can import the table)."""
    flags.DEFINE_enum("model", "lenet5", list(MODELS), "The network.")
    flags.DEFINE_list("bits", ["0.125", "0.0625", "0.03125"], "Bits budgets.")
    flags.DEFINE_list("methods", METHODS, f"Methods, of {METHODS}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each pretrains its own network).")
    flags.DEFINE_float("df_macs", 0.1, "MAC budget of df_unify.")
    flags.DEFINE_list("rho", ["0.001", "1.0"], "Unify's rho (start, end).")
    flags.DEFINE_integer("magnitude_bits", DEFAULT_MAGNITUDE_BITS, "Unify's magnitude bits.")
    flags.DEFINE_integer("pretrain_epochs", 4, "Epochs of the original model.")
    flags.DEFINE_integer("search_epochs", 2, "Epochs of search inside the fit.")
    flags.DEFINE_integer("fit_epochs", 4, "Epochs of the compressed fit (search + fine-tune).")
    flags.DEFINE_integer("train_batches", 0, "Use only this many training batches (0: all).")
    flags.DEFINE_string("out", "docs/results/unify_mnist.json", "Result JSON.")
    flags.DEFINE_list("from_json", [], "Only print the table of these result JSONs (merged).")


def unify_block(bits: float, magnitude_bits: int) -> tuple[int, int]:
    """The shortest block (1, n), n in 4, 8, ..., 64, whose unified blocks store at most
    90% of `bits` (a sign bit per weight and `magnitude_bits` per block).

    Raises:
        ValueError: where none does.
    """
    for n in (4, 8, 16, 32, 64):
        if 1 + magnitude_bits / n <= 0.9 * 32 * bits:
            return (1, n)
    raise ValueError("unified weights keep a sign bit each: 1/32 of float32 at least")


def techniques(
    method: str,
    bits: float,
    base,
    rho: tuple = DEFAULT_RHO,
    df_macs: float = 0.1,
    magnitude_bits: int = DEFAULT_MAGNITUDE_BITS,
) -> tuple[list, tuple | None, th.Budget]:
    """(techniques, block of the counted format, budget) of `method` at `bits`, Unify's
    ADMM penalty rising over `rho`, its magnitudes in `magnitude_bits` and df_unify's
    MACs at `df_macs`.

    Raises:
        ValueError: where the method cannot reach `bits`, saying why.
    """
    budget = th.Budget(bits=bits)
    options = {"rho": rho, "magnitude_bits": magnitude_bits}
    if method == "unify":
        block = unify_block(bits, magnitude_bits)
        return [th.Unify(block=block, unify=None, prune=0.0, **options)], block, budget
    if method == "prune":
        return [th.Unify(block=(1, 4), unify=0.0, prune=None, **options)], (1, 4), budget
    if method == "both":
        return [th.Unify(block=(1, 4), unify=None, prune=None, **options)], (1, 4), budget
    if method == "cluster":
        clusters = 2 ** max(1, round(32 * bits))
        return [th.Cluster(clusters=clusters)], None, budget
    if method == "block_sparse":
        dense = [la for la in base.layers if isinstance(la, keras.layers.Dense)]
        entries = sum(la.kernel.shape.num_elements() for la in dense)
        allowed = bits * 32 * base.count_params() - 32 * (base.count_params() - entries)
        density = (allowed / entries - 1) / 32  # 32 bits per kept weight, 1 of bitmap each
        if density <= 0:
            raise ValueError(
                "the float32 convolutions and the Dense kernels' bitmaps alone exceed it"
            )
        sparse = th.Sparse(
            sparsity=1 - density, block_size=(1, 4), layers=[la.name for la in dense]
        )
        return [sparse], None, budget
    if method == "df_unify":
        df_budget = th.Budget(macs=df_macs, bits=bits)
        unified = th.Unify(block=(1, 4), unify=None, prune=None, **options)
        return [th.DF(ranks=False), unified], (1, 4), df_budget
    raise ValueError(f"unknown method {method!r}")


def run_one(method: str, base, bits: float, train, test, steps: int) -> dict:
    rho = tuple(float(r) for r in FLAGS.rho)
    chosen, block, budget = techniques(method, bits, base, rho, FLAGS.df_macs, FLAGS.magnitude_bits)
    search = FLAGS.search_epochs * steps
    compressed = th.hybrid_compress(base, budget, chosen, search_steps=search)
    compile_model(compressed, decay_steps=FLAGS.fit_epochs * steps)
    start = time.perf_counter()
    compressed.fit(train, epochs=FLAGS.fit_epochs, callbacks=[th.CompressionScheduler()], verbose=0)
    seconds = time.perf_counter() - start
    small = compile_model(th.strip(compressed))
    original, now = th.profile(base), th.profile(small, block=block)
    result = {
        "test_error": 1 - small.evaluate(test, verbose=0)[1],
        "mac_ratio": now.macs / original.macs,
        "multiply_ratio": now.multiplies / original.macs,
        "counted_bits": float(compressed.ratios(hard=True)["bits"]),
        "measured_bits": now.bits / (32 * original.params),
        "fit_seconds": seconds,
    }
    if block is not None:
        with tempfile.TemporaryDirectory() as folder:
            report = th.save_compact(small, os.path.join(folder, "m.thc"), block=block)
        result["compact_bytes"] = report.size_bytes
    return result


def main(argv):
    del argv
    if FLAGS.from_json:
        print(
            "\n".join(
                table(merged([json.loads(pathlib.Path(p).read_text()) for p in FLAGS.from_json]))
            )
        )
        return
    test = mnist("test", 1000)
    runs = []
    for seed in map(int, FLAGS.seeds):
        model = MODELS[FLAGS.model]
        base, train, steps = pretrained(model, seed, FLAGS.pretrain_epochs, FLAGS.train_batches)
        original = {"method": "original", "bits": 1.0, "seed": seed, "model": FLAGS.model}
        runs.append({**original, **original_of(base, test)})
        for bits in map(float, FLAGS.bits):
            for method in FLAGS.methods:
                keras.utils.set_random_seed(seed)
                entry = {"method": method, "bits": bits, "seed": seed, "model": FLAGS.model}
                try:
                    entry.update(run_one(method, base, bits, train, test, steps))
                except ValueError as err:
                    entry["skipped"] = str(err)
                runs.append(entry)
                print(json.dumps(entry), flush=True)
                save(runs)
    print("\n".join(table(runs)))


def original_of(base, test) -> dict:
    return {"test_error": 1 - base.evaluate(test, verbose=0)[1], "mac_ratio": 1.0}


def save(runs: list[dict]) -> None:
    """Writes the JSON after every run, so a cut-off benchmark keeps what it measured."""
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/unify_mnist.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command, "runs": runs}, indent=1))


def merged(records: list[dict]) -> list[dict]:
    """The runs of several result JSONs; a later file's run of a model, method, budget and
    seed replaces an earlier one (a re-run after a fix). A run without a model is LeNet-5's."""
    runs = {}
    for record in records:
        for run in record["runs"]:
            key = run.get("model", "lenet5"), run["method"], run["bits"], run["seed"]
            runs[key] = run
    return list(runs.values())


def table(runs: list[dict]) -> list[str]:
    """Markdown: per model, budget and method, mean test error (%) over seeds, the seeds,
    the counted and measured bits and the MACs; a skipped method with its reason."""
    lines = [
        "| model | bits budget | method | seeds | test error % (mean) | per seed "
        "| counted bits | measured bits | MACs | multiplies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r.get("model", "lenet5"), r["bits"], r["method"]) for r in runs)
    for model, bits, method in keys:
        same = [
            r
            for r in runs
            if (r.get("model", "lenet5"), r["bits"], r["method"]) == (model, bits, method)
        ]
        done = [r for r in same if "skipped" not in r]
        if not done:
            skipped = same[0]["skipped"]
            lines.append(f"| {model} | {bits:g} | {method} | - | - | {skipped} | | | | |")
            continue
        errors = [100 * r["test_error"] for r in done]
        per_seed = ", ".join(f"{e:.2f}" for e in errors)
        counted = _mean(done, "counted_bits")
        measured = _mean(done, "measured_bits")
        lines.append(
            f"| {model} | {bits:g} | {method} | {len(done)} | {statistics.mean(errors):.2f} "
            f"| {per_seed} "
            f"| {counted} | {measured} | {statistics.mean(r['mac_ratio'] for r in done):.3f} "
            f"| {_mean(done, 'multiply_ratio', 3)} |"
        )
    return lines


def _mean(runs: list[dict], key: str, digits: int = 4) -> str:
    values = [r[key] for r in runs if key in r]
    return f"{statistics.mean(values):.{digits}f}" if values else "-"


if __name__ == "__main__":
    define_flags()
    app.run(main)
