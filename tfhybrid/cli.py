"""The command line: `python -m tfhybrid export|report|latency-table MODEL [flags]`.

    python -m tfhybrid export MODEL.keras --quantize int8 --representative mnist \
        --target edgetpu --out model.tflite
    python -m tfhybrid report MODEL.keras [--original ORIGINAL.keras]
    python -m tfhybrid latency-table MODEL.keras --quantize int8 --threads 1 --out table.json

`export` writes the `.tflite` file and prints the export report (exit status 3
when `--target edgetpu` finds ops that cannot map). `report` prints the per-layer
MACs/params table, the totals (non-zero parameters and storage bits too) and, with
`--original`, the model's share of the original's MACs, params and bits, as a
`Budget` counts them. `latency-table` times the model and each of its layers over a
grid of kept channels in LiteRT and saves the table `Budget(latency=...)` reads (run
it where the model will run). `--help` (or `-h`) prints the usage; no arguments print it to
stderr with exit status 2. Bad input (a missing or non-Keras file, an unknown command
or flag, `--representative mnist` without MNIST) gives one line on stderr and exit
status 2.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import warnings
from typing import Any

import numpy as np
from absl import flags

from tfhybrid import _startup, api, cost, data, tfmot
from tfhybrid._keras import keras
from tfhybrid.export import tflite
from tfhybrid.export.latency_table import FRACTIONS, measure_latency_table
from tfhybrid.report import summary

FLAGS = flags.FlagValues()
flags.DEFINE_enum("quantize", "none", tflite.QUANTIZE_MODES, "Quantization.", flag_values=FLAGS)
flags.DEFINE_string(
    "representative",
    None,
    "Calibration/check inputs: 'mnist' (TFDS train images in [0, 1]), 'random' "
    "(standard normal), or a .npy file of inputs.",
    flag_values=FLAGS,
)
flags.DEFINE_enum("target", None, ["edgetpu"], "Deployment target.", flag_values=FLAGS)
flags.DEFINE_string(
    "out",
    None,
    "Output path (default: MODEL with .tflite, or .latency.json for latency-table).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "threads", 1, "latency-table: interpreter threads.", flag_values=FLAGS, lower_bound=1
)
flags.DEFINE_list(
    "fractions",
    [str(f) for f in FRACTIONS],
    "latency-table: the shares of each layer's channels to time (0: one channel).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "runs", 30, "latency-table: timed runs per operator.", flag_values=FLAGS, lower_bound=1
)
flags.DEFINE_bool("sparse", False, "Also use the sparse weight encoding.", flag_values=FLAGS)
flags.DEFINE_integer(
    "samples", 100, "Representative inputs to use.", flag_values=FLAGS, lower_bound=1
)
flags.DEFINE_string(
    "original",
    None,
    "report: the uncompressed model, to print the shares of it.",
    flag_values=FLAGS,
)

COMMANDS = ("export", "report", "latency-table")
EDGETPU_NOT_READY = 3
USAGE_ERROR = 2
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
USAGE = """usage: python -m tfhybrid COMMAND MODEL [flags]

commands:
  export MODEL  convert MODEL (.keras, .h5 or SavedModel folder) to .tflite, run it in
                LiteRT next to Keras and print the report
  report MODEL  print the per-layer MACs/params table and the totals (with --original,
                the shares of the original model)
  latency-table MODEL
                time MODEL and each of its layers over a grid of kept channels in LiteRT
                (--quantize none or int8, --threads) and save the table that
                Budget(latency=..., latency_table=...) reads

flags:
{flags}

exit status: 0 done; 2 bad input (one line on stderr); 3 `--target edgetpu` found ops
that cannot map to the Edge TPU.
"""


class CommandError(Exception):
    """Bad input on the command line: reported as one line, exit status 2."""


#: Errors of the user's input: one line and exit status 2, never a traceback.
USER_ERRORS = (CommandError, flags.Error, ValueError, FileNotFoundError, data.DataUnavailableError)


def run(argv: list[str]) -> int:
    """Parses `argv` (program name first), runs the command, returns the exit status."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage())
        return 0
    if len(argv) < 2:
        print(usage(), file=sys.stderr)
        return USAGE_ERROR
    try:
        args = FLAGS(list(argv))[1:]
        if not args or args[0] not in COMMANDS:
            given = f"'{args[0]}'" if args else "none"
            raise CommandError(f"unknown command {given}: use one of {', '.join(COMMANDS)}.")
        if len(args) != 2:
            raise CommandError(f"'{args[0]}' takes one MODEL path, got {len(args) - 1}.")
        model = load(args[1])
        if args[0] == "report":
            return report(model)
        if args[0] == "latency-table":
            return latency_table(model, args[1])
        return export(model, args[1])
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"tfhybrid: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        FLAGS.unparse_flags()


def usage() -> str:
    """The commands, flags and exit statuses, as `--help` prints them."""
    return USAGE.format(flags=FLAGS.module_help(__name__).strip().split("\n", 1)[1])


def load(path: str) -> Any:
    """Loads a Keras model (.keras, .h5 or SavedModel folder), tfhybrid and QAT layers known."""
    if not pathlib.Path(path).exists():
        raise CommandError(f"{path}: no such file.")
    with contextlib.ExitStack() as scopes:
        scopes.enter_context(api.custom_object_scope())
        scopes.enter_context(tfmot.quantize_scope())
        try:
            return keras.models.load_model(path, compile=False)
        except Exception as error:  # noqa: BLE001 - any load failure means "not a model"
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CommandError(
                f"{path} is not a Keras model (.keras, .h5 or SavedModel folder): {reason}"
            ) from error


def export(model: Any, model_path: str) -> int:
    """`export`: writes the .tflite file and prints its report; returns the exit status.

    The converter and LiteRT write their own log lines to stderr (C++, unaffected by
    `TF_CPP_MIN_LOG_LEVEL`); they are muted, and Python warnings print as one line each.
    """
    out = FLAGS.out or str(pathlib.Path(model_path).with_suffix(".tflite"))
    data = representative(FLAGS.representative, model, FLAGS.samples)
    with warnings.catch_warnings(record=True) as caught, _startup.stderr_muted():
        warnings.simplefilter("always")
        result = tflite.export_tflite(
            model,
            out,
            quantize=FLAGS.quantize,
            representative_data=data,
            target=FLAGS.target,
            sparse=FLAGS.sparse,
            samples=FLAGS.samples,
        )
    for warning in caught:
        print(f"tfhybrid: warning: {warning.message}", file=sys.stderr)
    print(result)
    if result.edgetpu is not None and not result.edgetpu.ok:
        return EDGETPU_NOT_READY
    return 0


def report(model: Any) -> int:
    """`report`: prints the per-layer MACs/params table (with `--original`, original →
    now per layer), the totals and, with `--original`, the shares of the original."""
    original = load(FLAGS.original) if FLAGS.original else None
    summary(model, original=original)
    prof = cost.profile(model)
    print(
        f"total: {prof.macs:,} MACs, {prof.params:,} params ({prof.nonzero_params:,} "
        f"non-zero), {prof.bits:,} bits"
    )
    if original is not None:
        shares = prof.ratios(cost.profile(original))
        print("share of the original: " + ", ".join(f"{k} {v:.4f}" for k, v in shares.items()))
    return 0


def latency_table(model: Any, model_path: str) -> int:
    """`latency-table`: measures and saves the model's latency table; returns 0."""
    data = representative(FLAGS.representative, model, FLAGS.samples)
    try:
        fractions = [float(f) for f in FLAGS.fractions]
    except ValueError as error:
        raise CommandError(f"--fractions={','.join(FLAGS.fractions)}: {error}") from error
    table = measure_latency_table(
        model,
        FLAGS.quantize,
        FLAGS.threads,
        fractions=fractions,
        representative_data=data,
        runs=FLAGS.runs,
    )
    out = FLAGS.out or str(pathlib.Path(model_path).with_suffix(".latency.json"))
    table.save(out)
    print(
        f"{out}: {len(table.layers)} layers timed ({table.quantize}, {table.threads} "
        f"thread(s)); whole model {table.whole_ms:.4f} ms, of which {table.rest_ms:.4f} ms "
        "stays constant."
    )
    return 0


def representative(name: str | None, model: Any, samples: int) -> np.ndarray | None:
    """The inputs `--representative` names (None if not given)."""
    if name is None:
        return None
    if name == "mnist":
        images = data.mnist(f"train[:{samples}]").map(lambda image, label: image)
        return np.stack(list(images.as_numpy_iterator()))
    if name == "random":
        shape = tuple(model.inputs[0].shape[1:])
        return np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32)
    if not name.endswith(".npy") or not pathlib.Path(name).exists():
        raise CommandError(
            f"--representative={name}: use 'mnist', 'random' or an existing .npy file of inputs."
        )
    return np.load(name)


def main() -> None:
    """Entry point of `python -m tfhybrid`."""
    sys.exit(run(sys.argv))
