"""The DF search under the optimizers users compile with, on LeNet-5 / MNIST.

    python benchmarks/optimizers.py --optimizers=sgd_0.01,sgd_0.02,sgd_0.05,adam,rmsprop,adamw \
        --seeds=0,1 --budget=0.1 --out=docs/results/optimizers.json

The protocol a new user follows: pretrain LeNet-5 for 2 epochs with SGD(0.05, momentum
0.9, nesterov); `hybrid_compress(model, Budget(macs=0.1), search_steps=2 epochs)`;
compile with the optimizer under test (constant rate, as users write it); fit 4 epochs
with `CompressionScheduler()`; `strip`; fine-tune 1 epoch with the same optimizer;
report test error, MACs and params of the stripped model. The mask logits and rank
thresholds are updated by tfhybrid's own optimizer whatever the user compiles, so the
search should land in the same place under each.

Side by side, the control: the same pretrained network, uncompressed, trained as many
epochs (fit + fine-tune) with the same optimizer, which tells what the optimizer at a
constant rate gives without compression. The seed sets the weights' initialisation and
the order of the training batches, so one seed pretrains the same network for every
optimizer.
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
from mnist import lenet5, mnist  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras

OPTIMIZERS = {
    "sgd_0.01": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
    "sgd_0.02": lambda: keras.optimizers.SGD(0.02, momentum=0.9),
    "sgd_0.05": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
    "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=4e-3),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run, so tests can import the table)."""
    flags.DEFINE_list("optimizers", list(OPTIMIZERS), f"Optimizers, of {list(OPTIMIZERS)}.")
    flags.DEFINE_list("seeds", ["0", "1"], "Seeds (each pretrains its own network).")
    flags.DEFINE_float("budget", 0.1, "Share of the original MACs to keep.")
    flags.DEFINE_integer("pretrain_epochs", 2, "Epochs of SGD pretraining.")
    flags.DEFINE_integer("search_epochs", 2, "Epochs of search inside the compressed fit.")
    flags.DEFINE_integer("fit_epochs", 4, "Epochs of the compressed fit (search + fine-tune).")
    flags.DEFINE_integer("finetune_epochs", 1, "Epochs of fine-tuning after strip.")
    flags.DEFINE_integer("train_batches", 0, "Use only this many training batches (0: all).")
    flags.DEFINE_integer(
        "last_epoch_repeats",
        0,
        "Also fine-tune the stripped model this many more times, each from the same weights "
        "with its own batch order, with the optimizer under test and with its rate / 5.",
    )
    flags.DEFINE_string("out", "docs/results/optimizers.json", "Result JSON.")
    flags.DEFINE_list("from_json", [], "Only print the table of these result JSONs (merged).")


def compile_with(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def training_batches(seed: int):
    """MNIST's training set in batches of 128, shuffled by `seed` (reshuffled each epoch)."""
    train = mnist("train", 128, shuffle_seed=seed)
    return train.take(FLAGS.train_batches) if FLAGS.train_batches else train


def last_epoch_repeats(small, name: str, seed: int, test) -> dict:
    """Test errors of `small` fine-tuned for one epoch from its current weights, once per
    repeat with its own batch order: with the optimizer under test, and with that
    optimizer at a fifth of its rate. They say how far the protocol's last epoch alone
    moves the result, and whether a lower last-epoch rate would have kept it lower."""
    errors = {"repeat_test_errors": [], "slower_repeat_test_errors": []}
    for repeat in range(1, FLAGS.last_epoch_repeats + 1):
        train = training_batches(1000 * (seed + 1) + repeat)
        for key, divisor in (("repeat_test_errors", 1), ("slower_repeat_test_errors", 5)):
            optimizer = OPTIMIZERS[name]()
            optimizer.learning_rate = float(optimizer.learning_rate) / divisor
            copy = compile_with(keras.models.clone_model(small), optimizer)
            copy.set_weights(small.get_weights())
            copy.fit(train, epochs=FLAGS.finetune_epochs, verbose=0)
            errors[key].append(1 - copy.evaluate(test, verbose=0)[1])
    return errors


def uncompressed_error(model, name: str, seed: int, train, test) -> float:
    """Test error of `model` trained on, uncompressed, for the compressed run's epochs."""
    keras.utils.set_random_seed(seed)
    control = compile_with(keras.models.clone_model(model), OPTIMIZERS[name]())
    control.set_weights(model.get_weights())
    control.fit(train, epochs=FLAGS.fit_epochs + FLAGS.finetune_epochs, verbose=0)
    return 1 - control.evaluate(test, verbose=0)[1]


def run_one(name: str, seed: int, test) -> dict:
    keras.utils.set_random_seed(seed)
    train = training_batches(seed)
    steps = int(train.cardinality())
    model = compile_with(lenet5(), keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
    model.fit(train, epochs=FLAGS.pretrain_epochs, verbose=0)
    original = th.profile(model)
    original_error = 1 - model.evaluate(test, verbose=0)[1]
    control_error = uncompressed_error(model, name, seed, train, test)
    keras.utils.set_random_seed(seed)
    compressed = th.hybrid_compress(
        model, th.Budget(macs=FLAGS.budget), search_steps=FLAGS.search_epochs * steps
    )
    compile_with(compressed, OPTIMIZERS[name]())
    start = time.perf_counter()
    compressed.fit(train, epochs=FLAGS.fit_epochs, callbacks=[th.CompressionScheduler()], verbose=0)
    seconds = time.perf_counter() - start
    small = compile_with(th.strip(compressed), OPTIMIZERS[name]())
    before = 1 - small.evaluate(test, verbose=0)[1]
    repeats = last_epoch_repeats(small, name, seed, test) if FLAGS.last_epoch_repeats else {}
    small.fit(train, epochs=FLAGS.finetune_epochs, verbose=0)
    prof = th.profile(small)
    result = {
        "optimizer": name,
        "seed": seed,
        "original_test_error": original_error,
        "uncompressed_test_error": control_error,
        "test_error_after_fit": before,
        "test_error": 1 - small.evaluate(test, verbose=0)[1],
        "mac_ratio": prof.macs / original.macs,
        "param_ratio": prof.params / original.params,
        "fit_seconds": seconds,
        **repeats,
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv):
    del argv
    if FLAGS.from_json:
        runs = [
            r
            for path in FLAGS.from_json
            for r in json.loads(pathlib.Path(path).read_text())["results"]
        ]
        print("\n".join(table(runs)))
        return
    test = mnist("test", 1000)
    results = [run_one(name, int(seed), test) for name in FLAGS.optimizers for seed in FLAGS.seeds]
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/optimizers.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command, "results": results}, indent=1))
    print("\n".join(table(results)))


def table(results: list[dict]) -> list[str]:
    """Markdown rows: per optimizer and seed, the test errors (%) and the kept shares;
    then per optimizer the means, with the uncompressed control's where runs have it."""
    lines = [
        "| optimizer | seed | pretrained error % | uncompressed error % | error % after fit "
        "| error % after fine-tune | MACs | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['optimizer']} | {r['seed']} | {100 * r['original_test_error']:.2f} "
            f"| {_percent(r.get('uncompressed_test_error'))} "
            f"| {100 * r['test_error_after_fit']:.2f} | {100 * r['test_error']:.2f} "
            f"| {r['mac_ratio']:.3f} | {r['param_ratio']:.3f} |"
        )
    lines += [
        "",
        "| optimizer | seeds | mean pretrained error % | mean uncompressed error % "
        "| mean error % after fine-tune |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["optimizer"] for r in results):
        runs = [r for r in results if r["optimizer"] == name]
        controls = [r["uncompressed_test_error"] for r in runs if "uncompressed_test_error" in r]
        pretrained = statistics.mean(r["original_test_error"] for r in runs)
        control = statistics.mean(controls) if len(controls) == len(runs) else None
        final = statistics.mean(r["test_error"] for r in runs)
        lines.append(
            f"| {name} | {len(runs)} | {_percent(pretrained)} | {_percent(control)} "
            f"| {_percent(final)} |"
        )
    return lines + repeats_table(results)


def repeats_table(results: list[dict]) -> list[str]:
    """Markdown rows for runs with last-epoch repeats: per optimizer, the protocol's
    last epoch and its repeats from the same stripped weights, at the optimizer's rate
    and at a fifth of it (mean, lowest and highest test error %)."""
    runs = [r for r in results if r.get("repeat_test_errors")]
    if not runs:
        return []
    lines = [
        "",
        "| optimizer | seeds | last epoch, as run and repeated: mean (range) % "
        "| at a fifth of the rate: mean (range) % |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        same = [e for r in mine for e in [r["test_error"], *r["repeat_test_errors"]]]
        slower = [e for r in mine for e in r["slower_repeat_test_errors"]]
        lines.append(f"| {name} | {len(mine)} | {_spread(same)} | {_spread(slower)} |")
    return lines


def _spread(errors: list[float]) -> str:
    """'mean (lowest-highest)' of test errors, in %."""
    return f"{_percent(statistics.mean(errors))} ({_percent(min(errors))}-{_percent(max(errors))})"


def _percent(share: float | None) -> str:
    """A share as a percentage with two decimals; '-' where there is none."""
    return "-" if share is None else f"{100 * share:.2f}"


if __name__ == "__main__":
    define_flags()
    app.run(main)
