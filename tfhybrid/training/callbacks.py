"""Callbacks that drive and record a compression search during `model.fit`."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import tensorflow as tf

from tfhybrid._keras import keras, steps_per_execution
from tfhybrid.training.model import CompressionModel


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

    A search made without `search_steps` lasts the first half of the first `fit`
    (its epochs times its steps per epoch). A `fit` that ends before the search does
    warns: the masks and ranks are still soft, a later `fit` resumes the search.
    A search whose techniques all end it early (`Technique.search_done`, DHP once
    the budget is met) ends after that batch.
    """

    drives_compression = True

    def set_model(self, model: Any) -> None:
        if not isinstance(model, CompressionModel):
            raise ValueError(
                "CompressionScheduler drives models made by tfhybrid.hybrid_compress; got "
                f"{type(model).__name__} '{model.name}'. Fit the model hybrid_compress returned."
            )
        super().set_model(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        searching = not model.search_finished()
        per_call = steps_per_execution(model)
        if searching and per_call > 1:
            raise ValueError(
                f"Model '{model.name}' was compiled with steps_per_execution="
                f"{per_call}; the search takes its decisions between two "
                "batches, so compile it with steps_per_execution=1 until the search ends "
                f"(step {model.search_steps})."
            )
        if searching and model.search_steps is None:
            model.set_search_steps(_half_of_fit(self.params, model.name))
            model.train_function = model.make_train_function()
        # The step the next batch trains at, counted here: no read of the device per batch.
        self._next_step = int(model.compression_step.numpy())
        self._decided = not searching  # search_finished(), kept here for the same reason

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._decide_at(self._next_step)
        self._next_step += 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._decide_at(self._next_step)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for technique in self.model.techniques:
            technique.on_epoch_end(self.model, epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        if not self._decided:
            warnings.warn(
                f"The fit of model '{self.model.name}' ended at step {self._next_step} of its "
                f"compression search's {self.model.search_steps}: its masks and ranks are "
                "still soft. Fit on with CompressionScheduler() to finish the search (it "
                "resumes), or hybrid_compress with fewer search_steps; strip now takes the "
                "search's current decisions.",
                stacklevel=2,
            )

    def _decide_at(self, step: int) -> None:
        """Takes the decisions once, if the model (at `step`) has trained the search or
        every technique has ended its search early (`Technique.search_done`)."""
        if self._decided:
            return
        model = self.model
        if step >= model.search_steps or all(t.search_done(model) for t in model.techniques):
            model.finish_search()
            self._decided = True


def _half_of_fit(params: dict, name: str) -> int:
    """Half the batches of a fit (Keras's callback params), the default search length.

    Raises:
        ValueError: if the fit's length is unknown.
    """
    steps, epochs = params.get("steps"), params.get("epochs") or 1
    if not steps:
        raise ValueError(
            f"Model '{name}' was made without search_steps, so its search lasts half of its "
            "first fit, but this fit's length is unknown (a dataset of unknown cardinality). "
            "Pass search_steps=N to hybrid_compress, or steps_per_epoch=N to fit."
        )
    return max(1, steps * epochs // 2)


class CompressionLogger(keras.callbacks.Callback):
    """Writes the search to TensorBoard: the budget's ratios and each technique's figures.

    Scalars, at the model's compression step:
    - `compression/{macs,params}_ratio` (and `_soft`): the search's current hard
      (soft) decisions over the original model;
    - each technique's own figures (`Technique.scalars`); DF's: `kept_channels/<producers>`
      and `rank/<layer>`, what `strip` would keep now (the current decisions projected
      onto the budget), `search/kept_channels/<producers>` and `search/rank/<layer>`, the
      current hard decisions before that projection, and `compression/temperature`.

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
        with self._writer.as_default(step=step):
            for name, value in model.ratios(hard=True).items():
                tf.summary.scalar(f"compression/{name}_ratio", float(value))
            for name, value in model.ratios(hard=False).items():
                tf.summary.scalar(f"compression/{name}_ratio_soft", float(value))
            for technique in model.techniques:
                for tag, value in technique.scalars(model).items():
                    tf.summary.scalar(tag, value)
        self._writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
