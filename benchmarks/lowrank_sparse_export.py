"""What LowRankSparse's files weigh and how fast LiteRT runs them, next to its parts.

    python benchmarks/lowrank_sparse_export.py --model=mobilenet_v3_small --params=0.25 \
        --out=docs/results/lowrank_sparse_export/mobilenet_v3_small.json

The network (random weights, seed 0: sizes and latency depend on the layers' shapes and
S's sparsity, not on what the weights learned) is compressed to `--params` of its
parameters by each variant below, its search finished at once (`finish_search`), and
stripped:
  sparse          th.Sparse(): TF-MOT's pruning alone
  lowrank         th.DF(filters=False): low rank alone (ranks from the budget projection;
                  DF splits Dense and Conv2D layers, not attention)
  lowrank_fixed   L alone: th.LowRankSparse(rank=None, sparsity=0.9999), the one share of
                  each kernel's weights that meets the budget, S all but empty
  lowrank_sparse  th.LowRankSparse(rank=params / 2): L's chain beside S, summed by an Add
  lowrank_sparse_fifth  th.LowRankSparse(rank=params / 5): L a fifth of the budget's share
  folded          the last L + S above with fold=True, folded back into each layer's one kernel
                  (as large as the original's; in the table for its latency)
For each and for the dense original: the `.tflite` files (float and int8, each with and
without the converter's sparse encoding), their gzipped sizes, and the LiteRT latency of
each (median of `--runs`, 1 thread, XNNPACK or the built-in kernels as LiteRT chooses),
all in one process, side by side (`unify_export.files_of`).
"""

import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from absl import app, flags  # noqa: E402
from lowrank_sparse_mnist import MODELS  # noqa: E402
from mnist import mnist  # noqa: E402
from unify_export import files_of, files_table, write_results  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras
FLAGS = flags.FLAGS
METHODS = ["sparse", "lowrank", "lowrank_fixed", "lowrank_sparse", "lowrank_sparse_fifth", "folded"]


def define_flags() -> None:
    """The command line (defined only when run, so tests can import the table)."""
    flags.DEFINE_enum("model", "mobilenet_v3_small", list(MODELS), "The network.")
    flags.DEFINE_float("params", 0.25, "Params budget (share of the original's).")
    flags.DEFINE_list(
        "methods", ["sparse", "lowrank", "lowrank_sparse", "folded"], f"Of {METHODS}."
    )
    flags.DEFINE_integer("runs", 200, "Timed LiteRT inferences per file.")
    flags.DEFINE_string("out", "docs/results/lowrank_sparse_export.json", "Result JSON.")
    flags.DEFINE_list("from_json", [], "Only print the table of this result JSON.")


def stripped(base, variant: str, params: float, sparsity: float | None):
    """`base` compressed by `variant` to `params`, its search finished, stripped; and the
    compression model (the folded variant takes the parts' `sparsity`)."""
    chosen = {
        "sparse": lambda: [th.Sparse()],
        "lowrank": lambda: [th.DF(filters=False)],
        "lowrank_fixed": lambda: [th.LowRankSparse(rank=None, sparsity=0.9999)],
        "lowrank_sparse": lambda: [th.LowRankSparse(rank=params / 2)],
        "lowrank_sparse_fifth": lambda: [th.LowRankSparse(rank=params / 5)],
        "folded": lambda: [th.LowRankSparse(rank=params / 2, sparsity=sparsity, fold=True)],
    }[variant]()
    compressed = th.hybrid_compress(base, th.Budget(params=params), chosen, search_steps=1)
    compressed.finish_search()
    return th.strip(compressed), compressed


def main(argv):
    del argv
    if FLAGS.from_json:
        print("\n".join(table(json.loads(pathlib.Path(FLAGS.from_json[0]).read_text()))))
        return
    keras.utils.set_random_seed(0)
    base = MODELS[FLAGS.model]()
    test = mnist("test", 1000)
    representative = test.unbatch().map(lambda x, y: x).batch(1).take(100)
    results = {"command": "python benchmarks/lowrank_sparse_export.py " + " ".join(sys.argv[1:])}
    sparsity = None
    with tempfile.TemporaryDirectory() as folder:
        results["dense"] = files_of(base, None, representative, folder, FLAGS.runs)
        for method in FLAGS.methods:
            small, compressed = stripped(base, method, FLAGS.params, sparsity)
            if method.startswith("lowrank_sparse"):
                sparsity = compressed.technique("lowrank_sparse").sparsity
            results[method] = files_of(small, None, representative, folder, FLAGS.runs)
            now, original = th.profile(small), th.profile(base)
            results[method]["params"] = now.nonzero_params / original.params
            results[method]["macs"] = now.macs / original.macs
            print(method, json.dumps(results[method]), flush=True)
    write_results(results, FLAGS.out, table)


def table(results: dict) -> list[str]:
    """Markdown: per variant its measured MACs and non-zero params (shares of the
    original's), and per .tflite file its bytes, gzipped bytes and LiteRT median latency."""

    def cells(r: dict) -> list[str]:
        return [f"{r.get('macs', 1.0):.3f}", f"{r.get('params', 1.0):.3f}"]

    return files_table(results, ["variant", "MACs", "params"], cells)


if __name__ == "__main__":
    define_flags()
    app.run(main)
