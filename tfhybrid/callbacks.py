"""Callbacks that drive and record a compression search during `model.fit`."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import tensorflow as tf

from tfhybrid._keras import keras
from tfhybrid.techniques.df import HybridModel


class CompressionScheduler(keras.callbacks.Callback):
    """Drives the compression search during `fit`.

    Like TF-MOT's `UpdatePruningStep`: every schedule (temperatures, penalty
    weight) is a function of the model's compression step, which each training
    step advances; when the search's last batch has trained, this callback makes the
    decisions hard and projects them onto the budget. Training then goes on with the
    frozen structure (fine-tuning). Taken right after that batch, not before the next
    one, the decisions are what an epoch's validation, `evaluate` or `predict` see
    when a `fit` ends with the search: from then on the model's masks read the
    frozen decisions. A `fit` of a model saved at the search's end before they were
    taken takes them before its first batch.
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
        self._decided = not searching  # search_finished(), kept here for the same reason

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._decide_at(self._next_step)
        self._next_step += 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._decide_at(self._next_step)

    def _decide_at(self, step: int) -> None:
        """Takes the decisions once, if the model (at `step`) has trained the search."""
        if step >= self.model.search_steps and not self._decided:
            self.model.finish_search()
            self._decided = True


class CompressionLogger(keras.callbacks.Callback):
    """Writes the search to TensorBoard: ratios, temperature, kept channels and ranks.

    Scalars, at the model's compression step:
    - `compression/{macs,params}_ratio` (and `_soft`): the search's current hard
      (soft) decisions over the original model;
    - `kept_channels/<producers>`, `rank/<layer>`: what `strip` would keep now, the
      current decisions projected onto the budget;
    - `search/kept_channels/<producers>`, `search/rank/<layer>`: the current hard
      decisions before that projection, to see how the search itself meets the budget.

    Args:
        log_dir: folder for the TensorBoard event files.
        update_freq: "epoch" writes at the end of every epoch; an integer N also every
            N training batches (like `keras.callbacks.TensorBoard`'s `update_freq`), to
            follow the decisions within an epoch.

    Raises:
        ValueError: if `update_freq` is neither "epoch" nor a positive integer.
    """

    def __init__(self, log_dir: str, update_freq: str | int = "epoch"):
        super().__init__()
        batches = isinstance(update_freq, numbers.Integral) and not isinstance(update_freq, bool)
        if update_freq != "epoch" and not (batches and update_freq > 0):
            raise ValueError(
                f"CompressionLogger(update_freq={update_freq!r}): give 'epoch' or a positive "
                "number of batches, e.g. update_freq=50."
            )
        self.log_dir = log_dir
        self.update_freq = update_freq if update_freq == "epoch" else int(update_freq)
        self._writer = None
        self._written_at = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.update_freq == "epoch":
            return
        step = int(self.model.compression_step.numpy())
        if step % self.update_freq == 0:
            self._write(step)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._write(int(self.model.compression_step.numpy()))

    def _write(self, step: int) -> None:
        if step == self._written_at:  # an epoch's end right after a batch's write
            return
        self._written_at = step
        model = self.model
        keep, active = model.hard_decisions()
        gates = model.gates
        with self._writer.as_default(step=step):
            for name, value in model.ratios(hard=True).items():
                tf.summary.scalar(f"compression/{name}_ratio", float(value))
            for name, value in model.ratios(hard=False).items():
                tf.summary.scalar(f"compression/{name}_ratio_soft", float(value))
            if gates is not None:
                temperature = float(gates.temperature(gates.step))
                tf.summary.scalar("compression/temperature", temperature)
                for index, (gid, key) in enumerate(zip(gates.group_ids, gates.group_keys)):
                    producers = "+".join(key)
                    tf.summary.scalar(f"kept_channels/{producers}", int(np.sum(keep[gid])))
                    current = int(np.sum(gates.mask(index, hard=True).numpy()))
                    tf.summary.scalar(f"search/kept_channels/{producers}", current)
            for layer in model.factored_layers:
                tf.summary.scalar(f"rank/{layer.name}", int(np.sum(active[layer.name])))
                current = int(layer.soft_rank(hard=True).numpy())
                tf.summary.scalar(f"search/rank/{layer.name}", current)
        self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
