"""MNIST for the examples, benchmarks and the command line, with one clear error offline.

`tfds.load("mnist")` reads a prepared copy from `TFDS_DATA_DIR` (or
`~/tensorflow_datasets`) and otherwise downloads it. Offline, that download retries
for minutes and ends in a traceback; `mnist` checks first and raises
`DataUnavailableError` with what to do instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import tensorflow as tf

#: Where TFDS downloads MNIST from; probed once before a download.
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
PROBE_TIMEOUT_S = 5


class DataUnavailableError(RuntimeError):
    """The data set is neither prepared locally nor downloadable now."""


def mnist(split: str) -> tf.data.Dataset:
    """MNIST images scaled to [0, 1] (float32, 28x28x1) with their integer labels.

    Args:
        split: a TFDS split, e.g. "train", "test" or "train[:100]".

    Returns:
        An unbatched `tf.data.Dataset` of `(image, label)`.

    Raises:
        DataUnavailableError: MNIST is not prepared in the TFDS data folder and
            cannot be downloaded (one line saying how to get it).
    """
    import tensorflow_datasets as tfds

    with _tfds_logs_quiet():
        builder = tfds.builder("mnist")
        if not builder.is_prepared():
            _download(builder)
        images = builder.as_dataset(split=split, as_supervised=True)
    return images.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))


@contextlib.contextmanager
def _tfds_logs_quiet() -> Iterator[None]:
    """TFDS logs where it reads from at INFO, and an empty data folder at WARNING: only
    errors pass while it loads (what it found is in the result, or in our error)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(builder) -> None:
    """Downloads and prepares MNIST, or says in one line how to get it."""
    folder = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    how = (
        f"MNIST is not prepared in TFDS_DATA_DIR={folder} and {{why}}. Go online (tfds "
        "downloads it, 11 MB) or set TFDS_DATA_DIR to a folder holding a prepared copy."
    )
    import requests  # a dependency of tensorflow-datasets

    try:
        requests.head(MNIST_URL, timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as error:
        raise DataUnavailableError(
            how.format(why=f"{MNIST_URL} cannot be reached ({type(error).__name__})")
        ) from error
    try:
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - any failure here means "no MNIST"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataUnavailableError(how.format(why=f"the download failed: {reason}")) from error
