"""Where does LiteRT time go when channels are removed? Per-operator latency, measured.

    python benchmarks/litert_op_profile.py --runs=30

MobileNetV2 (224 x 224, random weights: latency does not depend on them) and copies with
50% of every prunable channel group removed (L1 norm), as is and with kept counts
rounded up to multiples of 8 and 16 (`_r8`, `_r16`: SIMD kernels work on tiles of output
channels), each as float32 and full-integer int8 `.tflite`.
Every operator is timed as its own one-op model (`tfhybrid.export.op_profile`, 1 thread,
median of --runs). Per op type: summed ms in the full and the pruned model, the speed-up,
and for convolutions the MAC reduction (speed-up ÷ MAC reduction: 1.0 = what the MACs
promise); then the whole-model times and the convolutions that gain least. Last, the
latency of one 1x1 Conv2D (as MobileNetV2's projections) over a sweep of its output channels
(--sweep_outputs), to see whether int8 time falls with them. Writes litert_op_profile.json
under --out.
"""

import json
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import tfhybrid as th  # noqa: E402
from tfhybrid.export import op_profile  # noqa: E402
from tfhybrid.techniques import magnitude  # noqa: E402

keras = th.keras
FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 30, "Timed inferences per operator and per whole model.")
flags.DEFINE_integer("size", 224, "Input height and width.")
flags.DEFINE_float("share", 0.5, "Share of every prunable group's channels removed.")
flags.DEFINE_integer("calibration", 20, "Representative inputs for int8.")
flags.DEFINE_list("round_to", ["1", "8", "16"], "Kept channel counts rounded up to these.")
flags.DEFINE_integer("worst", 8, "Convolutions listed with the least speed-up per MAC saved.")
flags.DEFINE_list(
    "sweep_outputs", [str(n) for n in range(4, 68, 4)], "Output channels of the 1x1 conv sweep."
)
flags.DEFINE_list(
    "sweep_shape", ["28", "28", "96"], "Input (height, width, channels) of the sweep."
)
flags.DEFINE_string("out", "benchmarks/results", "Folder for litert_op_profile.json.")

FORMATS = {"fp32": "none", "int8": "int8"}


def models() -> dict:
    """MobileNetV2 and its pruned copies (kept counts rounded up to each --round_to)."""
    size = FLAGS.size
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    family = {"mobilenet_v2": model}
    for round_to in map(int, FLAGS.round_to):
        name = f"mobilenet_v2_pruned{int(FLAGS.share * 100)}" + (
            f"_r{round_to}" if round_to > 1 else ""
        )
        family[name] = th.prune_channels(model, magnitude.l1_removal(model, FLAGS.share, round_to))
    return family


def exported(model, path: pathlib.Path, quantize: str) -> pathlib.Path:
    """`model` as a `.tflite` file, calibrated (int8) on random inputs in [-1, 1]."""
    shape = (FLAGS.calibration, *model.inputs[0].shape[1:])
    inputs = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    th.export_tflite(
        model, path, quantize=quantize, representative_data=inputs, samples=FLAGS.calibration
    )
    return path


def profiled(family: dict, folder: pathlib.Path) -> dict:
    """Every model in every format, profiled op by op."""
    profiles = {}
    for name, model in family.items():
        for fmt, quantize in FORMATS.items():
            path = exported(model, folder / f"{name}_{fmt}.tflite", quantize)
            profiles[name, fmt] = op_profile.profile_ops(path, runs=FLAGS.runs)
            print(name, fmt, f"{profiles[name, fmt].whole_ms:.3f} ms", flush=True)
    return profiles


def pointwise_sweep(folder: pathlib.Path) -> dict:
    """Median ms of one 1x1 Conv2D per output channel count, per format."""
    height, width, channels = map(int, FLAGS.sweep_shape)
    rows = {}
    for outputs in map(int, FLAGS.sweep_outputs):
        conv = keras.Sequential(
            [keras.Input((height, width, channels)), keras.layers.Conv2D(outputs, 1)]
        )
        for fmt, quantize in FORMATS.items():
            path = exported(conv, folder / f"pointwise_{outputs}_{fmt}.tflite", quantize)
            timing = th.benchmark_tflite(path, runs=FLAGS.runs * 10)
            rows.setdefault(fmt, {})[outputs] = timing["median_ms"]
    return rows


def by_type(profile: op_profile.OpProfile) -> dict:
    """Per op type: summed ms and MACs."""
    rows: dict = {}
    for timing in profile.ops:
        row = rows.setdefault(timing.op, {"ms": 0.0, "macs": 0})
        row["ms"] += timing.median_ms
        row["macs"] += timing.macs
    return rows


def compared(base: op_profile.OpProfile, small: op_profile.OpProfile) -> dict:
    """Per op type: ms and MACs of both, the speed-up and the MAC reduction."""
    full, cut = by_type(base), by_type(small)
    rows = {}
    for op, row in full.items():
        other = cut.get(op, {"ms": 0.0, "macs": 0})
        rows[op] = {
            "full_ms": row["ms"],
            "pruned_ms": other["ms"],
            "share_of_pruned_time": other["ms"] / small.sum_ms,
            "speedup": row["ms"] / other["ms"] if other["ms"] else None,
            "mac_reduction": row["macs"] / other["macs"] if other["macs"] else None,
        }
    return rows


def worst_convolutions(base: op_profile.OpProfile, small: op_profile.OpProfile) -> list:
    """The convolutions whose speed-up falls furthest below their MAC reduction (the
    two graphs have the same ops in the same order: channel removal keeps the graph)."""
    if [t.op for t in base.ops] != [t.op for t in small.ops]:
        return []
    rows = []
    for full, cut in zip(base.ops, small.ops):
        if not cut.macs:
            continue
        speedup, reduction = full.median_ms / cut.median_ms, full.macs / cut.macs
        rows.append(
            {
                "index": cut.index,
                "op": cut.op,
                "output_shape": cut.output_shape,
                "full_output_shape": full.output_shape,
                "full_ms": full.median_ms,
                "pruned_ms": cut.median_ms,
                "speedup_over_mac_reduction": speedup / reduction,
            }
        )
    rows.sort(key=lambda r: r["speedup_over_mac_reduction"])
    return rows[: FLAGS.worst]


def report(profiles: dict, names: list[str]) -> dict:
    results = {}
    base = names[0]
    for fmt in FORMATS:
        full = profiles[base, fmt]
        for name in names[1:]:
            small = profiles[name, fmt]
            results[f"{name}_{fmt}"] = {
                "whole_ms": {"full": full.whole_ms, "pruned": small.whole_ms},
                "sum_of_ops_ms": {"full": full.sum_ms, "pruned": small.sum_ms},
                "macs": {
                    "full": sum(t.macs for t in full.ops),
                    "pruned": sum(t.macs for t in small.ops),
                },
                "by_op_type": compared(full, small),
                "worst_convolutions": worst_convolutions(full, small),
            }
    return results


def tables(results: dict) -> str:
    lines = []
    for key, entry in results.items():
        whole, summed, macs = entry["whole_ms"], entry["sum_of_ops_ms"], entry["macs"]
        reduction = macs["full"] / macs["pruned"]
        lines += [
            f"**{key}**: whole model {whole['full']:.3f} -> {whole['pruned']:.3f} ms "
            f"({whole['full'] / whole['pruned']:.2f}x for {reduction:.2f}x fewer MACs, "
            f"{whole['full'] / whole['pruned'] / reduction:.2f}); ops summed "
            f"{summed['full']:.3f} -> {summed['pruned']:.3f} ms",
            "",
            "| op | full ms | pruned ms | share of pruned time | speed-up | MAC reduction |",
            "|---|---|---|---|---|---|",
        ]
        for op, row in sorted(entry["by_op_type"].items(), key=lambda kv: -kv[1]["full_ms"]):
            speedup = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
            cut = f"{row['mac_reduction']:.2f}x" if row["mac_reduction"] else "-"
            lines.append(
                f"| {op} | {row['full_ms']:.3f} | {row['pruned_ms']:.3f} | "
                f"{row['share_of_pruned_time']:.0%} | {speedup} | {cut} |"
            )
        lines += [
            "",
            "| op # | op | output (pruned) | output (full) | full ms | pruned ms "
            "| speed-up ÷ MACs |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in entry["worst_convolutions"]:
            lines.append(
                f"| {row['index']} | {row['op']} | {row['output_shape']} | "
                f"{row['full_output_shape']} | {row['full_ms']:.3f} | {row['pruned_ms']:.3f} | "
                f"{row['speedup_over_mac_reduction']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def sweep_table(sweep: dict) -> str:
    shape = "x".join(FLAGS.sweep_shape)
    counts = list(next(iter(sweep.values())))
    lines = [
        f"1x1 Conv2D on {shape} inputs, median ms by output channels:",
        "",
        "| format | " + " | ".join(map(str, counts)) + " |",
        "|---" * (len(counts) + 1) + "|",
    ]
    for fmt, row in sweep.items():
        lines.append(f"| {fmt} | " + " | ".join(f"{row[n]:.4f}" for n in counts) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    family = models()
    with tempfile.TemporaryDirectory() as tmp:
        profiles = profiled(family, pathlib.Path(tmp))
        sweep = pointwise_sweep(pathlib.Path(tmp))
    results = report(profiles, list(family))
    command = (
        f"python benchmarks/litert_op_profile.py --runs={FLAGS.runs} --size={FLAGS.size} "
        f"--share={FLAGS.share} --calibration={FLAGS.calibration} "
        f"--round_to={','.join(FLAGS.round_to)} --sweep_shape={','.join(FLAGS.sweep_shape)}"
    )
    (out / "litert_op_profile.json").write_text(
        json.dumps({"command": command, "results": results, "pointwise_sweep": sweep}, indent=2)
    )
    print(tables(results))
    print(sweep_table(sweep))


if __name__ == "__main__":
    app.run(main)
