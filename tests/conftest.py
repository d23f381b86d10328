"""Shared test set-up: quiet TensorFlow, examples/ importable, deterministic seeds, the
slow marker."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains on real data (run with -m slow)")


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    tf.random.set_seed(0)


@pytest.fixture
def offline_env(tmp_path) -> dict:
    """This process's environment with an empty TFDS folder and every download refused
    (a proxy on the discard port, where nothing listens)."""
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    refused = "http://127.0.0.1:9"
    proxies = dict.fromkeys(["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"], refused)
    return {**env, **proxies, "TFDS_DATA_DIR": str(tmp_path / "no_tfds")}
