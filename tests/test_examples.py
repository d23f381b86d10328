"""The README's main job, end to end on real MNIST (slow: pytest -m slow)."""

import importlib.util
import os
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lenet_mnist.py"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TFDS_DATA_DIR"), reason="needs TFDS_DATA_DIR (MNIST)")
def test_lenet_demo_compresses_and_keeps_accuracy():
    spec = importlib.util.spec_from_file_location("lenet_mnist", EXAMPLE)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.FLAGS(["lenet_mnist", "--budget=0.1", "--epochs=1", "--finetune_epochs=1"])
    result = demo.run()
    (macs_before, macs_after), (params_before, params_after) = result["macs"], result["params"]
    assert macs_after <= 0.1 * macs_before and params_after < params_before
    assert result["accuracy"][0] > 0.97 and result["accuracy"][1] > 0.97
