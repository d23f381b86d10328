"""The README's main job: end to end on real MNIST (slow: pytest -m slow), its error
without MNIST, and the README's results table as the demo wrote it."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import demo_results
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lenet_mnist.py"


@pytest.fixture(scope="module")
def demo():
    """The demo script as a module (its flags defined once per process)."""
    if "lenet_mnist" in sys.modules:
        return sys.modules["lenet_mnist"]
    spec = importlib.util.spec_from_file_location("lenet_mnist", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["lenet_mnist"] = module
    return module


def test_the_demo_without_mnist_says_how_to_get_it_in_one_line(offline_env):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=offline_env
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("lenet_mnist: error: MNIST is not prepared in TFDS_DATA_DIR=")
    assert "set TFDS_DATA_DIR" in done.stderr and "Go online" in done.stderr


def test_the_readme_shows_the_table_the_demo_wrote():
    result = json.loads((ROOT / "docs" / "results" / "demo.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = demo_results.README_BLOCK.search(readme)
    assert block, "README.md lost its demo results block"
    assert block[0] == f"{block[1]}{demo_results.results_table(result)}\n{block[2]}"
    assert result["macs"][1] <= result["budget"] * result["macs"][0]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TFDS_DATA_DIR"), reason="needs TFDS_DATA_DIR (MNIST)")
def test_lenet_demo_compresses_keeps_accuracy_and_the_readme_cli_runs(demo, tmp_path):
    demo.FLAGS(
        ["lenet_mnist", "--budget=0.1", "--epochs=1", "--finetune_epochs=1",
         f"--save_dir={tmp_path / 'models'}"]
    )  # fmt: skip
    result = demo.run()
    (macs_before, macs_after), (params_before, params_after) = result["macs"], result["params"]
    assert macs_after <= 0.1 * macs_before and params_after < params_before
    assert max(result["test_error"]) < 0.03
    for line in readme_cli_lines():
        done = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stderr)


def readme_cli_lines() -> list[str]:
    """The `python -m tfhybrid` lines of the README, continuation lines joined."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    found = [line for line in lines if line.startswith("python -m tfhybrid ")]
    assert found, "the README shows no command line"
    return [line.replace("python ", f"{sys.executable} ", 1) for line in found]
