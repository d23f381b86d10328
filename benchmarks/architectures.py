"""Which channel groups of modern architectures tfhybrid can prune, and why not the rest.

    python benchmarks/architectures.py --out=docs/results/architectures.json

For tf_keras.applications models (weights=None, 32 x 32 inputs) and a small ViT written
with tf_keras layers, counts the channel groups, those that touch neither the model's
input nor its output ("inner"), the inner ones that are prunable, and the reasons the
others are kept whole (by the kind of layer named, with one example each). Prints a
Markdown table and writes the JSON.
"""

import collections
import json
import os
import pathlib
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from absl import app, flags  # noqa: E402
from vit import small_vit  # noqa: E402

import tfhybrid as th  # noqa: E402

keras = th.keras
layers = keras.layers

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/architectures.json", "Where to write the JSON.")
flags.DEFINE_list(
    "models",
    "EfficientNetB0,MobileNetV3Large,RegNetX004,RegNetY004,ConvNeXtTiny,ConvNeXtSmall,SmallViT",
    "Models to analyse.",
)

EDGE = ("it touches the model input", "it feeds the model output")


def build(name: str) -> keras.Model:
    if name == "SmallViT":
        return small_vit()
    return getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )


def reason_kind(reason: str) -> str:
    """A reason with layer names and numbers taken out, to count alike reasons together."""
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", reason))


def analyse(name: str) -> dict:
    groups = th.channel_groups(build(name))
    inner = [g for g in groups if not (g.reason or "").startswith(EDGE)]
    kinds = collections.Counter(reason_kind(g.reason) for g in inner if not g.prunable)
    examples = {}
    for g in inner:
        if not g.prunable:
            examples.setdefault(reason_kind(g.reason), g.reason)
    return {
        "groups": len(groups),
        "inner": len(inner),
        "inner_prunable": sum(g.prunable for g in inner),
        "kept_whole": [{"count": n, "example": examples[k]} for k, n in kinds.most_common()],
    }


def main(argv):
    del argv
    results = {}
    for name in FLAGS.models:
        results[name] = analyse(name)
    print("| model | groups | inner | inner prunable | kept whole (count: an example's reason) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        why = "; ".join(f"{k['count']}: {k['example']}" for k in r["kept_whole"]) or "-"
        prunable = f"{r['inner_prunable']} ({r['inner_prunable'] / max(r['inner'], 1):.0%})"
        print(f"| {name} | {r['groups']} | {r['inner']} | {prunable} | {why} |")
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
