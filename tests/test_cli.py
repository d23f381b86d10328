"""`python -m tfhybrid export|report`: happy paths and every bad-input path."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tfhybrid as th
from tfhybrid import cli
from tfhybrid.techniques import magnitude

from models import lenet5, near_tied_logits

keras = th.keras


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = lenet5()
    small = th.prune_channels(model, magnitude.l1_removal(model, 0.5))
    path = tmp_path_factory.mktemp("cli") / "lenet_small.keras"
    small.save(path)
    return path


def run(capsys, *args):
    status = cli.run(["tfhybrid", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_export_int8_for_the_edgetpu(model_file, tmp_path, capsys):
    out_file = tmp_path / "m.tflite"
    status, out, err = run(
        capsys, "export", model_file, "--quantize", "int8", "--representative", "random",
        "--target", "edgetpu", "--out", out_file, "--samples", "20",
    )  # fmt: skip
    assert status == 0, err
    assert out_file.stat().st_size > 0
    assert "inputs ['int8'], outputs ['int8']" in out and "Edge TPU: all" in out


def test_export_prints_no_converter_logs_and_warnings_in_one_line(tmp_path):
    near_tied_logits().save(tmp_path / "ties.keras")
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, np.random.default_rng(0).random((50, 4), np.float32))
    done = subprocess.run(
        [sys.executable, "-m", "tfhybrid", "export", str(tmp_path / "ties.keras"),
         "--quantize=int8", f"--representative={inputs}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("tfhybrid: warning: export_tflite: top-1 agreement")
    assert "top1_agreement=0" in done.stdout


MNIST_DIR = pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")) / "mnist"


@pytest.mark.skipif(not MNIST_DIR.expanduser().exists(), reason="MNIST not prepared for TFDS")
def test_export_calibrates_on_mnist(model_file, tmp_path, capsys):
    status, out, err = run(
        capsys, "export", model_file, "--quantize=int8", "--representative=mnist",
        "--samples=50", f"--out={tmp_path / 'm.tflite'}",
    )  # fmt: skip
    assert status == 0, err
    assert "samples=50" in out and "inputs ['int8']" in out


def test_export_defaults_to_float_next_to_the_model(model_file, capsys):
    status, out, _ = run(capsys, "export", model_file)
    assert status == 0
    assert model_file.with_suffix(".tflite").exists() and "quantize=none" in out


def test_export_with_a_npy_of_inputs(model_file, tmp_path, capsys):
    data = tmp_path / "inputs.npy"
    np.save(data, np.random.default_rng(0).random((30, 28, 28, 1), np.float32))
    status, out, _ = run(
        capsys, "export", model_file, "--quantize=int8", f"--representative={data}",
        f"--out={tmp_path / 'q.tflite'}",
    )  # fmt: skip
    assert status == 0 and "samples=30" in out


def test_export_exits_3_when_the_edgetpu_check_fails(tmp_path, capsys):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    model = keras.Model(inputs, keras.layers.LeakyReLU()(x))
    model.save(tmp_path / "leaky.keras")
    status, out, _ = run(
        capsys, "export", tmp_path / "leaky.keras", "--representative=random", "--target=edgetpu"
    )
    assert status == cli.EDGETPU_NOT_READY
    assert "[unsupported_op]" in out and "LEAKY_RELU" in out


def test_report_prints_the_layer_table(model_file, capsys):
    status, out, _ = run(capsys, "report", model_file)
    assert status == 0
    assert (
        "conv1" in out and f"total: {th.profile(keras.models.load_model(model_file)).macs:,}" in out
    )


def test_report_gives_a_stacked_models_shares_of_the_original(tmp_path, capsys):
    original = lenet5()
    budget = th.Budget(macs=0.3, params=0.2)
    compressed = th.hybrid_compress(
        original, budget, [th.DF(ranks=False), th.Sparse(sparsity=0.5)], search_steps=2
    )
    compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
    y = np.arange(16) % 10
    compressed.fit(x, y, batch_size=8, verbose=0, callbacks=[th.CompressionScheduler()])
    small_path, original_path = tmp_path / "small.keras", tmp_path / "original.keras"
    th.strip(compressed).save(small_path)
    original.save(original_path)
    status, out, err = run(capsys, "report", small_path, "--original", original_path)
    assert status == 0, err
    shares = dict(
        part.split() for part in out.split("share of the original: ")[1].strip().split(", ")
    )
    assert float(shares["macs"]) <= 0.3 and float(shares["params"]) <= 0.2
    assert float(shares["bits"]) <= 0.2 + 1 / 32  # 32 bits per non-zero, 1 per entry
    assert " non-zero), " in out
    assert "conv1" in out and "20 → " in out  # the per-layer table, original → now


def test_latency_table_saves_the_table_a_latency_budget_reads(model_file, tmp_path, capsys):
    out_path = tmp_path / "table.json"
    status, out, err = run(
        capsys, "latency-table", model_file, "--quantize=int8", "--fractions=0,1",
        "--runs=2", f"--out={out_path}",
    )  # fmt: skip
    assert status == 0, err
    table = th.LatencyTable.load(out_path)
    assert table.quantize == "int8" and {"conv1", "conv2", "fc1"} <= set(table.layers)
    assert f"{out_path}: {len(table.layers)} layers timed (int8, 1 thread(s))" in out
    # the table fits the model (a budget below 1 could be out of reach: on LeNet-5 int8 the
    # fixed ops' share of 2 timed runs varies from run to run, 0.93 seen)
    budget = th.Budget(latency=1.0, latency_table=out_path)
    th.hybrid_compress(keras.models.load_model(model_file), budget)


@pytest.fixture(scope="module")
def search_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "searching.keras"
    th.hybrid_compress(lenet5(), th.Budget(macs=0.2)).save(path)
    return path


def write_junk(tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    return junk


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "missing.keras"], "missing.keras: no such file"),
        (["export", "JUNK"], "is not a Keras model"),
        (["report", "JUNK"], "is not a Keras model"),
        (["export", "SEARCH"], "export_tflite needs the plain model"),
        (["export", "MODEL", "--colour=red"], "Unknown command line flag 'colour'"),
        (["export", "MODEL", "--quantize=int4"], "--quantize"),
        (["export", "MODEL", "--representative=imagenet"], "--representative=imagenet"),
        (["export", "MODEL", "--quantize=int8"], "needs representative_data"),
        (["latency-table", "MODEL", "--quantize=float16"], "quantize='float16'"),
        (["latency-table", "MODEL", "--fractions=half"], "--fractions=half"),
        (["latency-table", "SEARCH"], "measure_latency_table needs the plain model"),
        (["compress", "MODEL"], "unknown command 'compress'"),
        (["MODEL"], "unknown command"),
        (["report"], "takes one MODEL path, got 0"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(
    args, message, model_file, search_file, tmp_path, capsys
):
    paths = {"MODEL": model_file, "JUNK": write_junk(tmp_path), "SEARCH": search_file}
    status, out, err = run(capsys, *[str(paths.get(a, a)) for a in args])
    assert status == cli.USAGE_ERROR
    assert err.count("\n") == 1 and err.startswith("tfhybrid: error: "), err
    assert message in err


def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tfhybrid", "report", str(tmp_path / "none.keras")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == cli.USAGE_ERROR
    assert done.stderr == f"tfhybrid: error: {tmp_path / 'none.keras'}: no such file.\n"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage(flag, capsys):
    status, out, err = run(capsys, flag)
    assert status == 0 and not err
    assert out.startswith("usage: python -m tfhybrid COMMAND MODEL") and "--quantize" in out


def test_no_arguments_print_the_usage_and_exit_2(capsys):
    status, out, err = run(capsys)
    assert status == cli.USAGE_ERROR and not out
    assert err.startswith("usage: ") and "export MODEL" in err


def test_the_command_line_prints_no_tensorflow_noise():
    done = subprocess.run(
        [sys.executable, "-m", "tfhybrid", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: ")
    assert done.stderr == ""


def test_mnist_unavailable_is_one_line_and_exit_2(model_file, tmp_path, offline_env):
    """No prepared MNIST and no way to download it (a proxy that refuses)."""
    done = subprocess.run(
        [sys.executable, "-m", "tfhybrid", "export", str(model_file), "--quantize=int8",
         "--representative=mnist", f"--out={tmp_path / 'm.tflite'}"],
        capture_output=True, text=True, env=offline_env,
    )  # fmt: skip
    assert done.returncode == cli.USAGE_ERROR, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("tfhybrid: error: MNIST is not prepared in TFDS_DATA_DIR=")
