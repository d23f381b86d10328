"""Paired comparison of two mnist_hybrid.py runs of one method, seed by seed.

    python benchmarks/compare_hybrid.py benchmarks/results/mnist_hybrid.json \
        docs/results/df_plugin/lenet5/mnist_hybrid.json --model=lenet5

For each MAC budget in the second run: the test error (%) of each seed in both runs, and
both means over the seeds they share.
"""

import json
import pathlib
import statistics

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "lenet5", "Model in both runs.")
flags.DEFINE_string("method", "hybrid", "Method in both runs.")


def errors(path: str, model: str, method: str) -> dict:
    """budget -> seed -> test error of `method` on `model` in one result JSON."""
    results = json.loads(pathlib.Path(path).read_text())["results"][model]["budgets"]
    return {
        budget: {r["seed"]: r["test_error"] for r in runs.get(method, []) if "test_error" in r}
        for budget, runs in results.items()
    }


def compare(before: dict, after: dict) -> list[str]:
    """Markdown rows: budget, per-seed errors before -> after, and the paired means."""
    lines = ["| MAC budget | seed: before -> after (%) | mean before | mean after |"]
    lines.append("|---|---|---|---|")
    for budget, now in after.items():
        seeds = sorted(set(now) & set(before.get(budget, {})))
        if not seeds:
            continue
        pairs = ", ".join(
            f"{s}: {100 * before[budget][s]:.2f} -> {100 * now[s]:.2f}" for s in seeds
        )
        mean_before = 100 * statistics.mean(before[budget][s] for s in seeds)
        mean_after = 100 * statistics.mean(now[s] for s in seeds)
        lines.append(f"| {budget} | {pairs} | {mean_before:.3f} | {mean_after:.3f} |")
    return lines


def main(argv):
    before, after = (errors(path, FLAGS.model, FLAGS.method) for path in argv[1:3])
    print("\n".join(compare(before, after)))


if __name__ == "__main__":
    app.run(main)
