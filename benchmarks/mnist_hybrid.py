"""The learned hybrid (DF) against its parts and the usual baselines, on MNIST.

    python benchmarks/mnist_hybrid.py --models=lenet5,lenet_300_100 \
        --budgets=0.5,0.25,0.1,0.05 --seeds=0,1 --pretrain_epochs=4 \
        --search_epochs=2 --finetune_epochs=4

For every model, MAC budget and seed, from the same pretrained network and with the
same number of epochs after pretraining (search + fine-tune):
  hybrid        hybrid_compress(filters and ranks)
  filters_only  hybrid_compress(ranks=False)
  dhp           hybrid_compress(techniques=[th.DHP()]): hypernetwork-generated kernels
                and sparse latents; its search ends when the budget is met (at most
                --search_epochs), then it fine-tunes for the remaining epochs
  dhp_scratch   DHP on the untrained network (the paper's setting), for the pretraining +
                search + fine-tune epochs, searching over the pretraining + search ones
  ranks_only    hybrid_compress(filters=False)
  l1_uniform    the same share of every group's channels removed by L1 norm, the
                largest share that meets the budget; fine-tuned
  svd_uniform   every Dense/Conv2D truncated to the same share of its rank, the
                largest that meets the budget; fine-tuned
  scratch       the architecture `hybrid` found, re-initialised and trained for the
                pretraining + search + fine-tune epochs (Liu et al. 2019)
  tfmot         TF-MOT prune_low_magnitude at the hybrid's parameter share
                (its dense MACs do not fall: reported as they are)
Every training phase uses Adam (1e-3) with a cosine decay to 0 over the phase.
Also the steady-state ms/step of plain training, the hybrid and DHP searches and TF-MOT
pruning (same model and batch, median over steps). Writes JSON and a PNG of test
error vs MACs under --out.
"""

import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # timing, when imported

import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from absl import app, flags  # noqa: E402
from mnist import compile_model, lenet5, lenet_300_100, mnist, resnet20  # noqa: E402
from timing import StepTimer  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid.techniques import magnitude  # noqa: E402

keras = th.keras
MODELS = {"lenet5": lenet5, "lenet_300_100": lenet_300_100, "resnet20": resnet20}
METHODS = [
    "hybrid",
    "filters_only",
    "ranks_only",
    "dhp",
    "dhp_scratch",
    "l1_uniform",
    "svd_uniform",
    "scratch",
    "tfmot",
]

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["lenet5", "lenet_300_100"], "Models to compress.")
flags.DEFINE_list("budgets", ["0.5", "0.25", "0.1", "0.05"], "MAC budgets.")
flags.DEFINE_list("methods", METHODS, "Methods to run.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (each seed pretrains its own network).")
flags.DEFINE_integer("pretrain_epochs", 4, "Epochs of the original model.")
flags.DEFINE_integer("search_epochs", 2, "Epochs of search (or the first fine-tune epochs).")
flags.DEFINE_integer("finetune_epochs", 4, "Epochs of fine-tuning after the search.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("timing_steps", 60, "Steps timed per training kind (0: skip timing).")
flags.DEFINE_integer("train_batches", 0, "Use only this many training batches (0: all).")
flags.DEFINE_string("out", "benchmarks/results", "Folder for mnist_hybrid.json/.png.")
flags.DEFINE_string(
    "tensorboard_dir",
    "",
    "If set, every search writes TensorBoard scalars (CompressionLogger) under "
    "DIR/MODEL/BUDGET/SEED/METHOD: ratios, kept channels and ranks, before and after "
    "the budget projection.",
)
flags.DEFINE_integer("tensorboard_every", 10, "With --tensorboard_dir: write every N batches.")
flags.DEFINE_enum(
    "compression_lr",
    "default",
    ["default", "cosine_fit"],
    "The compression optimizer: hybrid_compress's default (Adam(1e-3), constant), or "
    "Adam(1e-3) with the weights' cosine decay over the whole fit.",
)
flags.DEFINE_bool("from_json", False, "Only redraw the table and plot from --out's JSON.")
flags.DEFINE_bool("timing_only", False, "Only measure ms/step (e.g. on a quiet machine).")
flags.DEFINE_list(
    "merge", [], "Result JSONs (e.g. one per model or seed, run in parallel) to combine into --out."
)


def error_of(model, test) -> float:
    if not model.compiled_loss:
        compile_model(model)
    return 1.0 - model.evaluate(test, verbose=0)[1]


def record(model, test, original) -> dict:
    """Test error, MACs and params (also as ratios), and each weighted layer's output width."""
    prof = th.profile(model)
    return {
        "test_error": error_of(model, test),
        "macs": prof.macs,
        "params": prof.params,
        "mac_ratio": prof.macs / original.macs,
        "param_ratio": prof.params / original.params,
        "widths": {c.name: c.output_shape[-1] for c in prof.layers if c.macs and c.params},
    }


def largest_meeting(budget: float, original_macs: int, build, lo=0.0, hi=1.0):
    """The largest share in [lo, hi] whose model (build(share)) meets the MAC budget."""
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = build(mid)
        if model is not None and th.profile(model).macs <= budget * original_macs:
            best, lo = model, mid
        else:
            hi = mid
    return best


def svd_truncated(model, share: float):
    ranks = {}
    for layer in model.layers:
        if type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
            kernel = layer.get_weights()[0]
            full = min(int(np.prod(kernel.shape[:-1])), kernel.shape[-1])
            rank = max(1, int(share * full))
            rows, cols = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
            if rank * (rows + cols) < rows * cols:
                ranks[layer.name] = rank
    return th.factorize(model, ranks) if ranks else None


def search_callbacks(log_dir: str) -> list:
    """The scheduler, and a CompressionLogger writing to `log_dir` unless it is empty."""
    callbacks = [th.CompressionScheduler()]
    if log_dir:
        callbacks.append(th.CompressionLogger(log_dir, update_freq=FLAGS.tensorboard_every))
    return callbacks


def compression_optimizer(decay_steps: int):
    """The `--compression_lr` choice (None: hybrid_compress's default)."""
    if FLAGS.compression_lr == "default":
        return None
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps)
    return keras.optimizers.Adam(schedule)


def run_method(method, base, budget, train, test, steps_per_epoch, found, log_dir=""):
    after_epochs = FLAGS.search_epochs + FLAGS.finetune_epochs
    original = th.profile(base)
    decay = after_epochs * steps_per_epoch
    if method in ("hybrid", "filters_only", "ranks_only", "dhp", "dhp_scratch"):
        search_epochs = FLAGS.search_epochs
        options = {"filters": method != "ranks_only", "ranks": method != "filters_only"}
        if method.startswith("dhp"):
            options = {"techniques": [th.DHP()]}
        if method == "dhp_scratch":
            base = keras.models.clone_model(base)  # fresh random weights
            search_epochs += FLAGS.pretrain_epochs
            after_epochs += FLAGS.pretrain_epochs
            decay = after_epochs * steps_per_epoch
        compressed = th.hybrid_compress(
            base,
            th.Budget(macs=budget),
            search_steps=search_epochs * steps_per_epoch,
            compression_optimizer=compression_optimizer(decay),
            **options,
        )
        compile_model(compressed, decay_steps=decay)
        callbacks = search_callbacks(log_dir)
        compressed.fit(train, epochs=after_epochs, verbose=0, callbacks=callbacks)
        small = th.strip(compressed)
        if method == "hybrid":
            found["hybrid"] = small
        return record(small, test, original)
    if method == "l1_uniform":
        small = largest_meeting(
            budget,
            original.macs,
            lambda keep: th.prune_channels(base, magnitude.l1_removal(base, 1 - keep)),
            lo=0.0,
            hi=1.0,
        )
    elif method == "svd_uniform":
        small = largest_meeting(budget, original.macs, lambda s: svd_truncated(base, s))
    elif method == "scratch":
        small = keras.models.clone_model(found["hybrid"])  # fresh random weights
        after_epochs += FLAGS.pretrain_epochs
    elif method == "tfmot":
        return run_tfmot(base, found, train, test, after_epochs, original, decay)
    if small is None:
        return {"unreachable": True}
    compile_model(small, decay_steps=after_epochs * steps_per_epoch)
    small.fit(train, epochs=after_epochs, verbose=0)
    return record(small, test, original)


def run_tfmot(base, found, train, test, epochs, original, decay_steps):
    share = th.profile(found["hybrid"]).params / original.params if "hybrid" in found else 0.1
    schedule = tfmot.sparsity.keras.ConstantSparsity(1 - share, begin_step=0, frequency=50)
    start = keras.models.clone_model(base)
    start.set_weights(base.get_weights())
    pruned = tfmot.sparsity.keras.prune_low_magnitude(start, pruning_schedule=schedule)
    compile_model(pruned, decay_steps=decay_steps)
    pruned.fit(
        train, epochs=epochs, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()]
    )
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    result = record(stripped, test, original)
    nonzero = sum(int(np.count_nonzero(w)) for w in stripped.get_weights())
    result.update(nonzero_params=nonzero, nonzero_param_ratio=nonzero / original.params)
    return result


def step_times(build, train, steps: int) -> dict:
    """Median ms/step of plain training, the hybrid search and TF-MOT pruning."""
    data = train.take(steps).cache()
    list(data)  # fill the cache before timing
    kinds = {}
    plain = compile_model(build())
    compressed = compile_model(
        th.hybrid_compress(build(), th.Budget(macs=0.1), search_steps=10 * steps)
    )
    generated = compile_model(
        th.hybrid_compress(build(), th.Budget(macs=0.1), [th.DHP()], search_steps=10 * steps)
    )
    pruned = compile_model(
        tfmot.sparsity.keras.prune_low_magnitude(
            build(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.9, 0)
        )
    )
    runs = {
        "plain": (plain, []),
        "hybrid_search": (compressed, [th.CompressionScheduler()]),
        "dhp_search": (generated, [th.CompressionScheduler()]),
        "tfmot_pruning": (pruned, [tfmot.sparsity.keras.UpdatePruningStep()]),
    }
    for _ in range(2):  # interleaved twice: the machine's drift hits all alike
        for name, (model, callbacks) in runs.items():
            timer = StepTimer()
            model.fit(data, epochs=1, verbose=0, callbacks=[*callbacks, timer])
            kinds.setdefault(name, []).extend(timer.times[5:])
    medians = {k: 1000 * statistics.median(v) for k, v in kinds.items()}
    return {
        "ms_per_step": medians,
        "ratio_to_plain": {k: v / medians["plain"] for k, v in medians.items()},
    }


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for method in METHODS:
            per_budget = [
                [
                    (r["mac_ratio"], 100 * r["test_error"])
                    for r in runs.get(method, [])
                    if "mac_ratio" in r
                ]
                for runs in results[name].get("budgets", {}).values()
            ]
            # In MAC order: by each budget's smallest (MAC ratio, error) point.
            per_budget = sorted((points for points in per_budget if points), key=min)
            if not per_budget:
                continue
            means = [tuple(map(statistics.fmean, zip(*points))) for points in per_budget]
            line = ax.plot(*zip(*means), "o-" if method == "hybrid" else ".--", label=method)
            seeds = [point for points in per_budget for point in points]  # faint: each seed
            ax.plot(*zip(*seeds), ".", color=line[0].get_color(), alpha=0.3)
        ax.set_xscale("log")
        ax.set_yscale("log")  # uniform SVD errors (30-40%) next to the rest (~1%)
        ax.set_xlabel("MACs / original")
        ax.set_ylabel("test error (%)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def tables(results: dict) -> str:
    """Markdown: per model, test error (%) by budget and method, mean (min-max, seeds)
    and the hybrid's MACs / original; then the hybrid against its rivals seed by seed."""
    lines = []
    for name, entry in results.items():
        original = [100 * r["test_error"] for r in entry.get("original", [])]
        lines += [
            f"**{name}** (original: {_spread(original)}% test error)",
            "",
            "| MAC budget | hybrid MACs | " + " | ".join(METHODS) + " |",
            "|---" * (len(METHODS) + 2) + "|",
        ]
        for budget, runs in entry.get("budgets", {}).items():
            macs = [r["mac_ratio"] for r in runs.get("hybrid", []) if "mac_ratio" in r]
            cells = [
                _spread([100 * r["test_error"] for r in runs.get(m, []) if "test_error" in r])
                for m in METHODS
            ]
            hybrid_macs = f"{max(macs):.3f}" if macs else "-"
            lines.append(f"| {budget} | {hybrid_macs} | " + " | ".join(cells) + " |")
        lines += ["", *mac_ratios(entry.get("budgets", {})), "", *paired(entry.get("budgets", {}))]
        if "timing" in entry:
            ms, ratio = entry["timing"]["ms_per_step"], entry["timing"]["ratio_to_plain"]
            kinds = ", ".join(f"{k} {ms[k]:.1f} ({ratio[k]:.2f}x)" for k in ms)
            lines += ["", f"ms/step (median, batch {FLAGS.batch_size}): {kinds}"]
        lines.append("")
    return "\n".join(lines)


def mac_ratios(budgets: dict) -> list[str]:
    """Markdown: per budget, each method's mean MAC ratio after strip (a method may stop
    under its budget)."""
    lines = ["| MAC budget | " + " | ".join(f"{m} MACs" for m in METHODS) + " |"]
    lines.append("|---" * (len(METHODS) + 1) + "|")
    for budget, runs in budgets.items():
        cells = []
        for method in METHODS:
            ratios = [r["mac_ratio"] for r in runs.get(method, []) if "mac_ratio" in r]
            cells.append(f"{statistics.fmean(ratios):.3f}" if ratios else "-")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return lines


def paired(budgets: dict, rivals=("filters_only", "ranks_only", "dhp", "scratch")) -> list[str]:
    """Markdown: per budget, the hybrid's error minus each rival's on the same seed
    (mean, in points; negative: the hybrid is better) and on how many seeds the
    hybrid is at least as accurate."""
    lines = ["| MAC budget | " + " | ".join(f"hybrid - {r}" for r in rivals) + " |"]
    lines.append("|---" * (len(rivals) + 1) + "|")
    for budget, runs in budgets.items():
        hybrid = {r["seed"]: r["test_error"] for r in runs.get("hybrid", []) if "test_error" in r}
        cells = []
        for rival in rivals:
            diffs = [
                100 * (hybrid[r["seed"]] - r["test_error"])
                for r in runs.get(rival, [])
                if "test_error" in r and r["seed"] in hybrid
            ]
            wins = sum(d <= 0 for d in diffs)
            cells.append(f"{statistics.fmean(diffs):+.2f} ({wins}/{len(diffs)})" if diffs else "-")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return lines


def redraw(paths: list[pathlib.Path], out: pathlib.Path) -> None:
    """Combines result JSONs (models side by side) into --out's, with table and plot."""
    reports = [json.loads(path.read_text()) for path in paths]
    combined = {
        "commands": [c for r in reports for c in r.get("commands", [r.get("command")])],
        "complete": all(r.get("complete", True) for r in reports),
        "results": {},
    }
    for report in reports:  # later files add to (and override) earlier ones, seed by seed
        for name, entry in report["results"].items():
            _merge(combined["results"].setdefault(name, {}), entry)
    (out / "mnist_hybrid.json").write_text(json.dumps(combined, indent=2))
    plot(combined["results"], out / "mnist_hybrid.png")
    print(tables(combined["results"]))


def _merge(into: dict, entry: dict) -> None:
    """Adds `entry` to `into`: dicts merge key by key, runs by seed (`entry` wins);
    budgets stay largest first, so the tables read in MAC order."""
    for key, value in entry.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        elif isinstance(value, list) and all(isinstance(r, dict) and "seed" in r for r in value):
            seeds = {r["seed"] for r in value}
            kept = [r for r in into.get(key, []) if r["seed"] not in seeds]
            into[key] = sorted(kept + value, key=lambda r: r["seed"])
        else:
            into[key] = value
    if "budgets" in entry:
        into["budgets"] = dict(sorted(into["budgets"].items(), key=lambda kv: -float(kv[0])))


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean, low, high = statistics.fmean(values), min(values), max(values)
    return f"{mean:.2f} ({low:.2f}-{high:.2f}, n={len(values)})"


def main(argv):
    del argv
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    if FLAGS.from_json or FLAGS.merge:
        redraw([pathlib.Path(p) for p in FLAGS.merge] or [out / "mnist_hybrid.json"], out)
        return
    train = mnist("train", FLAGS.batch_size, shuffle_seed=0)
    if FLAGS.train_batches:
        train = train.take(FLAGS.train_batches)
    test = mnist("test", 1000)
    steps_per_epoch = int(train.cardinality())
    results = {}
    for name in FLAGS.models:
        entry = results.setdefault(
            name, {} if FLAGS.timing_only else {"budgets": {}, "original": []}
        )
        for seed in [] if FLAGS.timing_only else map(int, FLAGS.seeds):
            keras.utils.set_random_seed(seed)
            base = compile_model(
                MODELS[name](), decay_steps=FLAGS.pretrain_epochs * steps_per_epoch
            )
            base.fit(train, epochs=FLAGS.pretrain_epochs, verbose=0)
            original = th.profile(base)
            entry["original"].append({"seed": seed, **record(base, test, original)})
            for budget in map(float, FLAGS.budgets):
                found = {}
                runs = entry["budgets"].setdefault(str(budget), {})
                for method in FLAGS.methods:
                    keras.utils.set_random_seed(seed)
                    log_dir = FLAGS.tensorboard_dir and os.path.join(
                        FLAGS.tensorboard_dir, name, str(budget), str(seed), method
                    )
                    result = run_method(
                        method, base, budget, train, test, steps_per_epoch, found, log_dir
                    )
                    runs.setdefault(method, []).append({"seed": seed, **result})
                    print(name, budget, seed, method, json.dumps(result), flush=True)
                    save(results, out)
        if FLAGS.timing_steps:
            entry["timing"] = step_times(MODELS[name], train, FLAGS.timing_steps)
            print(name, "timing", json.dumps(entry["timing"]), flush=True)
    save(results, out, final=True)


def save(results: dict, out: pathlib.Path, final: bool = False) -> None:
    """Writes the JSON (after every run, so a cut-off run keeps what it measured)."""
    command = "python benchmarks/mnist_hybrid.py " + " ".join(
        f"--{k}={','.join(v) if isinstance(v, list) else v}"
        for k, v in [
            ("models", FLAGS.models),
            ("budgets", FLAGS.budgets),
            ("methods", FLAGS.methods),
            ("seeds", FLAGS.seeds),
            ("pretrain_epochs", FLAGS.pretrain_epochs),
            ("search_epochs", FLAGS.search_epochs),
            ("finetune_epochs", FLAGS.finetune_epochs),
            ("timing_steps", FLAGS.timing_steps),
            ("timing_only", FLAGS.timing_only),
        ]
    )
    report = {"command": command, "complete": final, "results": results}
    (out / "mnist_hybrid.json").write_text(json.dumps(report, indent=2))
    if final:
        plot(results, out / "mnist_hybrid.png")
        print(tables(results))


if __name__ == "__main__":
    app.run(main)
