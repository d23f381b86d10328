"""Parameter budgets on MNIST: LowRankSparse against its parts and DF.

    python benchmarks/lowrank_sparse_mnist.py --model=lenet_300_100 --params=0.5,0.25,0.1 \
        --seeds=0,1,2 --out=docs/results/lowrank_sparse_mnist.json

For every params budget (share of the original's parameters, non-zeros counted; with
`--budget=bits`, of its float32 storage) and seed,
from the same pretrained network and with the same epochs after it (`--search_epochs` of
search inside `--fit_epochs`, Adam with a cosine-decayed rate):
  lowrank_sparse  th.LowRankSparse(rank=budget / 2): L holds that share of each layer's
                  weights (about half the budget's; a Tucker-2 chain on k x k convs),
                  S's sparsity the one that meets the budget
  lowrank_sparse_alternating  the same with split="alternating" (L fitted to the kernel
                  less the entries S keeps)
  lowrank_sparse_fifth  th.LowRankSparse(rank=budget / 5): L holds a fifth of the budget's
                  share of each layer's weights, S the rest
  lowrank_sparse_tenth  th.LowRankSparse(rank=budget / 10): L at a tenth
  lowrank_sparse_auto   th.LowRankSparse(rank="auto"): each layer's split chosen from its
                        weights (the share of L that leaves the least of its kernels out)
  lowrank_sparse_fifth_of_nonzeros  for a bits budget: L a fifth of the non-zeros it
                  leaves once S's bitmap (1/32 of float32) is paid,
                  th.LowRankSparse(rank=(budget - 1/32) / 5)
  sparse          th.Sparse(): TF-MOT's prune_low_magnitude, the sparsity that meets it
  lowrank_fixed   L alone: th.LowRankSparse(rank=None, sparsity=0.9999), the one share of
                  each layer's weights that meets the budget (truncated SVD pairs,
                  Tucker-2 chains on k x k convs) with S all but empty, fine-tuned
  lowrank         th.DF(filters=False): each layer's rank learned under the budget
  df              th.DF(): channels and ranks learned under the budget
Each run reports test error and the measured shares of MACs, non-zero parameters and bits.
"""

import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from absl import app, flags  # noqa: E402
from mnist import (  # noqa: E402
    compile_model,
    lenet5,
    lenet_300_100,
    mnist,
    mobilenet_v3_small,
    pretrained,
)
from vit import small_vit  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras
METHODS = [
    "lowrank_sparse",
    "lowrank_sparse_alternating",
    "lowrank_sparse_fifth",
    "lowrank_sparse_tenth",
    "lowrank_sparse_fifth_of_nonzeros",
    "lowrank_sparse_auto",
    "sparse",
    "lowrank_fixed",
    "lowrank",
    "df",
]
MODELS = {
    "lenet5": lenet5,
    "lenet_300_100": lenet_300_100,
    "mobilenet_v3_small": mobilenet_v3_small,
    "small_vit": lambda: small_vit(28, 1, positions=True),  # 4 x 4 patches, 2 blocks
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run, so tests can import the table)."""
    flags.DEFINE_enum("model", "lenet_300_100", list(MODELS), "The network.")
    flags.DEFINE_list("params", ["0.5", "0.25", "0.1"], "Budgets (shares of --budget).")
    flags.DEFINE_enum("budget", "params", ["params", "bits"], "What the budgets are shares of.")
    flags.DEFINE_list("methods", METHODS, f"Methods, of {METHODS}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each pretrains its own network).")
    flags.DEFINE_integer("pretrain_epochs", 4, "Epochs of the original model.")
    flags.DEFINE_integer("search_epochs", 2, "Epochs of search inside the fit.")
    flags.DEFINE_integer("fit_epochs", 4, "Epochs of the compressed fit (search + fine-tune).")
    flags.DEFINE_integer("train_batches", 0, "Use only this many training batches (0: all).")
    flags.DEFINE_string("out", "docs/results/lowrank_sparse_mnist.json", "Result JSON.")
    flags.DEFINE_list("from_json", [], "Only print the table of these result JSONs (merged).")
    flags.DEFINE_bool(
        "splits",
        False,
        "Only print, per budget and method, the share of the model's weights L holds, S's "
        "densities and L's ranks, on the first seed's network pretrained as for the runs "
        "(untrained with --pretrain_epochs=0: the shares depend on the shapes alone, except "
        "lowrank_sparse_auto's).",
    )


def once_each(runs: list[dict]) -> list[dict]:
    """`runs` without repeats of a (method, params, seed) already there: merged files may
    each hold the same seed's original network."""
    seen = set()
    kept = []
    for run in runs:
        key = (run["method"], kind_of(run), run["params"], run["seed"])
        if key not in seen:
            seen.add(key)
            kept.append(run)
    return kept


def kind_of(run: dict) -> str:
    """What a run's budget is a share of ("params" in files written before --budget)."""
    return run.get("budget", "params")


#: The share of float32 storage that S's bitmap takes (1 bit per entry of 32).
BITMAP_SHARE = 1 / 32


def techniques(method: str, params: float) -> list:
    """The techniques of `method` at a budget's share (see the module's docstring)."""
    return {
        "lowrank_sparse": lambda: [th.LowRankSparse(rank=params / 2)],
        "lowrank_sparse_fifth": lambda: [th.LowRankSparse(rank=params / 5)],
        "lowrank_sparse_tenth": lambda: [th.LowRankSparse(rank=params / 10)],
        "lowrank_sparse_auto": lambda: [th.LowRankSparse(rank="auto")],
        "lowrank_sparse_fifth_of_nonzeros": lambda: [
            th.LowRankSparse(rank=(params - BITMAP_SHARE) / 5)
        ],
        "lowrank_sparse_alternating": lambda: [
            th.LowRankSparse(rank=params / 2, split="alternating")
        ],
        "sparse": lambda: [th.Sparse()],
        "lowrank_fixed": lambda: [th.LowRankSparse(rank=None, sparsity=0.9999)],
        "lowrank": lambda: [th.DF(filters=False)],
        "df": lambda: [th.DF()],
    }[method]()


def run_one(method: str, base, params: float, train, test, steps: int) -> dict:
    chosen, search = techniques(method, params), FLAGS.search_epochs * steps
    budget = th.Budget(**{FLAGS.budget: params})
    compressed = th.hybrid_compress(base, budget, chosen, search_steps=search)
    compile_model(compressed, decay_steps=FLAGS.fit_epochs * steps)
    start = time.perf_counter()
    compressed.fit(train, epochs=FLAGS.fit_epochs, callbacks=[th.CompressionScheduler()], verbose=0)
    seconds = time.perf_counter() - start
    small = compile_model(th.strip(compressed))
    original, now = th.profile(base), th.profile(small)
    return {
        "test_error": 1 - small.evaluate(test, verbose=0)[1],
        "mac_ratio": now.macs / original.macs,
        "param_ratio": now.nonzero_params / original.params,
        "bits_ratio": now.bits / (32 * original.params),
        "fit_seconds": seconds,
    }


def main(argv):
    del argv
    if FLAGS.from_json:
        runs = [r for p in FLAGS.from_json for r in json.loads(pathlib.Path(p).read_text())["runs"]]
        print("\n".join(table(once_each(runs))))
        return
    if FLAGS.splits:
        model, budgets = MODELS[FLAGS.model](), list(map(float, FLAGS.params))
        if FLAGS.pretrain_epochs:
            seed = int(FLAGS.seeds[0])
            model = pretrained(
                MODELS[FLAGS.model], seed, FLAGS.pretrain_epochs, FLAGS.train_batches
            )[0]
        print("\n".join(splits(model, FLAGS.budget, budgets, FLAGS.methods)))
        return
    test = mnist("test", 1000)
    runs = []
    for seed in map(int, FLAGS.seeds):
        model = MODELS[FLAGS.model]
        base, train, steps = pretrained(model, seed, FLAGS.pretrain_epochs, FLAGS.train_batches)
        error = 1 - base.evaluate(test, verbose=0)[1]
        runs.append({"method": "original", "params": 1.0, "seed": seed, "test_error": error})
        for params in map(float, FLAGS.params):
            for method in FLAGS.methods:
                keras.utils.set_random_seed(seed)
                entry = {"method": method, "params": params, "seed": seed, "model": FLAGS.model}
                entry["budget"] = FLAGS.budget
                entry.update(run_one(method, base, params, train, test, steps))
                runs.append(entry)
                print(json.dumps(entry), flush=True)
                save(runs)
    print("\n".join(table(runs)))


def splits(model, kind: str, budgets: list[float], methods: list[str]) -> list[str]:
    """Markdown rows: per budget (shares of `kind`) and LowRankSparse or Sparse method,
    the share of `model`'s weights that L holds, the range of S's densities (the share
    of its entries each S keeps) at the search's end, and L's rank per layer (an
    attention's query/key/value/output)."""
    lines = [
        "| budget | method | L's weights / model's | S's density | L's ranks |",
        "|---|---|---|---|---|",
    ]
    for params in budgets:
        for method in methods:
            chosen = techniques(method, params)
            if chosen[0].name not in ("lowrank_sparse", "sparse"):
                continue
            budget = th.Budget(**{kind: params})
            compressed = th.hybrid_compress(model, budget, chosen, search_steps=2)
            technique = compressed.technique(chosen[0].name)
            low, densities, ranks = 0, [], []
            for wrapper in technique.layers_of(compressed):
                if technique.name == "lowrank_sparse":  # (a Conv2D's `rank` is its spatial rank)
                    rank = wrapper.layer.rank
                    rank = "/".join(map(str, rank.values())) if isinstance(rank, dict) else rank
                    ranks.append(f"{wrapper.layer.name} {rank}")
                pruned = {id(w) for w, _, _ in wrapper.pruning_vars}
                kernels = [w for w in wrapper.layer.trainable_weights if "bias" not in w.name]
                low += sum(int(w.shape.num_elements()) for w in kernels if id(w) not in pruned)
                densities.append(1.0 - technique.target_sparsity(wrapper.layer.name))
            lines.append(
                f"| {kind} {params:g} | {method} | {low / model.count_params():.3f} | "
                f"{min(densities):.4f}-{max(densities):.4f} | {', '.join(ranks) or '-'} |"
            )
    return lines


def save(runs: list[dict]) -> None:
    """Writes the JSON after every run, so a cut-off benchmark keeps what it measured."""
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/lowrank_sparse_mnist.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command, "runs": runs}, indent=1))


def table(runs: list[dict]) -> list[str]:
    """Markdown rows: per budget (what it is a share of, the share) and method, the mean
    test error (%) over seeds, its range, and the mean measured shares of MACs, non-zero
    params and bits. The original's row comes first."""
    lines = [
        "| budget | method | seeds | test error % (range) | MACs | params | bits |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((kind_of(r), r["params"], r["method"]) for r in runs)
    order = ["original", *METHODS]

    def rank(key: tuple) -> tuple:
        kind, share, method = key
        return (method != "original", kind != "params", -share, order.index(method))

    for kind, params, method in sorted(keys, key=rank):
        mine = [r for r in runs if (kind_of(r), r["params"], r["method"]) == (kind, params, method)]
        errors = [100 * r["test_error"] for r in mine]
        shares = [
            f"{statistics.mean(r[k] for r in mine):.3f}" if k in mine[0] else "-"
            for k in ("mac_ratio", "param_ratio", "bits_ratio")
        ]
        lines.append(
            f"| {'-' if method == 'original' else f'{kind} {params:g}'} | {method} | "
            f"{len(mine)} | {statistics.mean(errors):.2f} "
            f"({min(errors):.2f}-{max(errors):.2f}) | " + " | ".join(shares) + " |"
        )
    return lines


if __name__ == "__main__":
    define_flags()
    app.run(main)
