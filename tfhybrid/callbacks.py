"""Callbacks that drive and record a compression search during `model.fit`."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid._keras import keras
from tfhybrid.techniques.df import HybridModel


class CompressionScheduler(keras.callbacks.Callback):
    """Drives the compression search during `fit`.

    Like TF-MOT's `UpdatePruningStep`: every schedule (temperatures, penalty
    weight) is a function of the model's compression step, which each training
    step advances; when it reaches the search length, this callback makes the
    decisions hard and projects them onto the budget, before that batch. Training
    then goes on with the frozen structure (fine-tuning).
    """

    drives_compression = True

    def set_model(self, model: Any) -> None:
        if not isinstance(model, HybridModel):
            raise ValueError(
                "CompressionScheduler drives models made by tfhybrid.hybrid_compress; got "
                f"{type(model).__name__} '{model.name}'. Fit the model hybrid_compress returned."
            )
        super().set_model(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        searching = not model.search_finished()
        per_call = model._steps_per_execution  # noqa: SLF001 - Keras keeps no public getter
        if searching and per_call is not None and int(per_call.numpy()) > 1:
            raise ValueError(
                f"Model '{model.name}' was compiled with steps_per_execution="
                f"{int(per_call.numpy())}; the search takes its decisions between two "
                "batches, so compile it with steps_per_execution=1 until the search ends "
                f"(step {model.search_steps})."
            )
        # The step the next batch trains at, counted here: no read of the device per batch.
        self._next_step = int(model.compression_step.numpy())

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._next_step == self.model.search_steps:
            self.model.finish_search()
        self._next_step += 1


class CompressionLogger(keras.callbacks.Callback):
    """Writes the search to TensorBoard: ratios, temperature, kept channels and ranks.

    Args:
        log_dir: folder for the TensorBoard event files.
    """

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        model = self.model
        step = int(model.compression_step.numpy())
        keep, active = model.hard_decisions()
        with self._writer.as_default(step=step):
            for name, value in model.ratios(hard=True).items():
                tf.summary.scalar(f"compression/{name}_ratio", float(value))
            for name, value in model.ratios(hard=False).items():
                tf.summary.scalar(f"compression/{name}_ratio_soft", float(value))
            gates = model.gates
            if gates is not None:
                temperature = float(gates.temperature(gates.step))
                tf.summary.scalar("compression/temperature", temperature)
                for gid, key in zip(gates.group_ids, gates.group_keys):
                    tf.summary.scalar(f"kept_channels/{'+'.join(key)}", int(np.sum(keep[gid])))
            for name, kept in active.items():
                tf.summary.scalar(f"rank/{name}", int(np.sum(kept)))
        self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
