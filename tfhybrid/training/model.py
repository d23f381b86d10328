"""The compression model: a functional Keras model under one or several techniques.

It knows no technique's maths. It sums the shared budget penalty (from the
techniques' soft decisions, counted by one cost model) into the loss, gives the
gradients of the compression variables to an optimizer of its own and those of the
weights to the optimizer the user compiled, advances every technique layer's step
counter inside the training step, and at the search's end asks each technique to
make its decisions hard. `strip` merges the techniques' plans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import warnings
from typing import Any

import tensorflow as tf

from tfhybrid import budget as budget_lib
from tfhybrid import cost, plan, schedules
from tfhybrid._keras import keras, keras_functional
from tfhybrid.techniques import base

#: The optimizer of the compression variables (mask logits, thresholds, ...), whatever
#: optimizer the user compiles the model with. Techniques tune their variables' scales
#: for Adam's steps of about the learning rate; under SGD with momentum a step is the
#: gradient times the rate instead: LeNet-5 at 10% of its MACs collapsed to chance
#: when SGD(0.02, momentum 0.9) trained DF's mask logits.
DEFAULT_OPTIMIZER = {
    "class_name": "Adam",
    "config": {"learning_rate": 1e-3, "is_legacy_optimizer": False},
}


def default_temperature(search_steps: int) -> schedules.Schedule:
    """The soft decisions' temperature: 1 -> 0.05 exponentially over the search."""
    return schedules.ExponentialDecay(1.0, 0.05, search_steps)


def default_penalty(search_steps: int) -> schedules.Schedule:
    """The budget penalty's weight: 0 -> 5 over the search's first quarter."""
    return schedules.LinearRamp(0.0, 5.0, max(1, search_steps // 4))


@keras.utils.register_keras_serializable(package="tfhybrid")
class CompressionModel(keras.Model):
    """A functional model whose techniques search their compression during `fit`.

    Logs the current hard MACs/params/bits ratios as `macs_ratio`, `params_ratio` and
    `bits_ratio`, and
    refuses to `fit` during the search without a `CompressionScheduler`.

    Args:
        inputs, outputs: as for a functional `keras.Model`.
        compression: the settings (JSON text or dict): budget, cost model, original
            costs, techniques, penalty and temperature schedules, search steps and
            the compression optimizer's config.
    """

    def __init__(self, inputs, outputs, compression, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        if not isinstance(compression, str):
            compression = json.dumps(compression)
        self._compression = compression
        settings = json.loads(compression)
        self.budget = budget_lib.Budget(**settings["budget"])
        self.cost_model = cost.CostModel.from_config(settings["cost"])
        original = settings["original"]
        # {"macs", "params", "bits"} of the original model (bits: 32 per parameter).
        self.original_cost = {"bits": 32.0 * original["params"], **original}
        # Plain holders: Keras tracks neither the technique objects nor traced tensors.
        self._held = types.SimpleNamespace(
            techniques=[base.deserialize(c) for c in _techniques_of(settings)], ratios=None
        )
        self._read_search_length(settings)
        self.compression_optimizer = keras.optimizers.deserialize(
            settings.get("optimizer", DEFAULT_OPTIMIZER)
        )

    # -- techniques and their layers -------------------------------------------------
    @property
    def techniques(self) -> list[base.Technique]:
        """The techniques, in the order `hybrid_compress` got them."""
        return list(self._held.techniques)

    def technique(self, name: str) -> base.Technique | None:
        """The technique registered as `name` (e.g. "df"), or None."""
        return next((t for t in self._held.techniques if t.name == name), None)

    def technique_layers(self) -> list:
        """Every technique's training-time layers."""
        return [layer for t in self._held.techniques for layer in t.layers_of(self)]

    @property
    def compression_step(self) -> tf.Variable:
        """Batches trained so far (each training step advances it, in its graph)."""
        return self.technique_layers()[0].step

    def search_finished(self) -> bool:
        """True once the hard decisions were taken (the model is fine-tuning)."""
        return bool(self.technique_layers()[0].decided.numpy())

    def compression_variables(self) -> list[tf.Variable]:
        """The techniques' own variables: the compression optimizer updates them, never
        the optimizer the model was compiled with."""
        return [v for t in self._held.techniques for v in t.compression_variables(self)]

    # -- the search's length -----------------------------------------------------------
    def _read_search_length(self, settings: dict) -> None:
        """The search's length and the penalty schedule that follows from it."""
        steps = settings["search_steps"]
        self.search_steps = None if steps is None else int(steps)
        penalty = settings["penalty"] or schedules.serialize(default_penalty(steps or 1))
        self.penalty_weight = schedules.deserialize(penalty)

    def set_search_steps(self, steps: int) -> None:
        """Fixes the length of a search whose `search_steps` was left to the first fit.

        The default temperature and penalty schedules stretch over it; schedules the
        user gave stay. The model's traced functions are dropped so the next call
        traces the new schedules.

        Raises:
            ValueError: if the length was already set, or `steps` < 1.
        """
        settings = json.loads(self._compression)
        if settings["search_steps"] is not None or int(steps) < 1:
            raise ValueError(
                f"Model '{self.name}': the search's length is {settings['search_steps']}; "
                f"set_search_steps({steps}) sets it once, to at least 1."
            )
        settings["search_steps"] = int(steps)
        self._compression = json.dumps(settings)
        self._read_search_length(settings)
        for technique in self._held.techniques:
            technique.set_search_steps(self, int(steps))
        self.train_function = self.test_function = self.predict_function = None

    def temperature(self) -> schedules.Schedule:
        """The soft decisions' temperature schedule: the user's, or the default one
        stretched over the search (over 1 step while its length is unknown)."""
        settings = json.loads(self._compression)
        given = settings.get("temperature")
        if given is not None:
            return schedules.deserialize(given)
        return default_temperature(settings["search_steps"] or 1)

    def search_progress(self) -> str:
        """'step N of M' of the search (M: the length, or when it will be set)."""
        last = self.search_steps
        of = "half of the first fit" if last is None else last
        return f"step {int(self.compression_step.numpy())} of {of}"

    def _searching(self) -> str:
        return f"Model '{self.name}' is searching its compression ({self.search_progress()})"

    # -- cost ----------------------------------------------------------------------------
    def decisions(self, hard: bool = False) -> base.Decisions:
        """Every technique's current decisions, merged (soft tensors or hard)."""
        merged = base.Decisions()
        for technique in self._held.techniques:
            merged = merged.merged(technique.decisions(self, hard))
        return merged

    def kept_channels(self) -> dict:
        """Channel group id -> bool array of the channels `strip` keeps now, from every
        technique that removes channels (eagerly)."""
        kept = {}
        for technique in self._held.techniques:
            kept.update(technique.kept_channels(self))
        return kept

    def ratios_of(self, decisions: base.Decisions) -> dict:
        """MACs, params and bits of `decisions` over the original model's."""
        costs = decisions.costed_by(self.cost_model)
        return {k: costs[k] / self.original_cost[k] for k in costs}

    def ratios(self, hard: bool = False, straight_through: bool = False) -> dict:
        """MACs and params of the current decisions over the original's.

        Args:
            hard: count the hard decisions instead of the soft ones.
            straight_through: the hard counts' value with the soft counts' gradient,
                so that the penalty stops once the *hard* model meets the budget.
        """
        if not straight_through:
            return self.ratios_of(self.decisions(hard))
        soft, hard_now = self.decisions(), self.decisions(hard=True)
        counts = {k: _straight_through(hard_now.counts[k], v) for k, v in soft.counts.items()}
        ranks = {k: _straight_through(hard_now.ranks[k], v) for k, v in soft.ranks.items()}
        return self.ratios_of(dataclasses.replace(soft, counts=counts, ranks=ranks))

    # -- training ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _shared_decisions(self):
        """Each mask and gate is built once within it (see `base.SharedWithinAStep`)."""
        with contextlib.ExitStack() as stack:
            for layer in self.technique_layers():
                if isinstance(layer, base.SharedWithinAStep):
                    stack.enter_context(layer.shared_decisions())
            yield

    def call(self, inputs, training=None, mask=None):
        with self._shared_decisions():
            return super().call(inputs, training=training, mask=mask)

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python flow
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        loss = super().compute_loss(x, y, y_pred, sample_weight)
        step = self.compression_step
        last = -1 if self.search_steps is None else self.search_steps  # no penalty before fit
        weight = tf.where(step < last, self.penalty_weight(step), 0.0)
        ratios = self.ratios(straight_through=True)
        self._held.ratios = ratios
        penalty = tf.cast(budget_lib.penalty(ratios, self.budget), tf.float32)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        terms = [t.loss(self) for t in self._held.techniques]
        own = tf.add_n([term for term in terms if term is not None] or [0.0])
        return loss + (weight * penalty + own) / replicas

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python flow
    def compute_metrics(self, x, y, y_pred, sample_weight):
        result = super().compute_metrics(x, y, y_pred, sample_weight)
        traced = self._held.ratios
        if traced is not None and _in_current_graph(traced["macs"]):
            # The straight-through ratios have the hard ratios' value: no second count.
            hard = {k: tf.stop_gradient(v) for k, v in traced.items()}
        else:
            hard = self.ratios(hard=True)
        return {**result, **{f"{k}_ratio": v for k, v in hard.items()}}

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python flow
    def train_step(self, data):
        """One gradient of the loss: the user's optimizer updates the weights, the
        compression optimizer the compression variables; then every technique's
        after-step hook (its counters advance inside the step's graph, like the
        optimizer's `iterations`: a per-batch eager update from a callback costs more
        than the search's own ops on small models)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        own = self.compression_variables()
        weights = self._weights_of_user_optimizer()
        for technique in self._held.techniques:
            technique.before_step(self, self.compression_step)
        with self._shared_decisions():
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred, sample_weight)
            gradients = tape.gradient(loss, weights + own)
            self.optimizer.apply_gradients(zip(gradients[: len(weights)], weights))
            if own:
                self.compression_optimizer.apply_gradients(zip(gradients[len(weights) :], own))
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        for layer in self.technique_layers():
            layer.step.assign_add(1)
        for technique in self._held.techniques:
            technique.after_step(self)
        return logs

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python flow
    def test_step(self, data):
        """Keras's test step, each mask and gate built once for the pass and the budget."""
        with self._shared_decisions():
            return super().test_step(data)

    def _weights_of_user_optimizer(self) -> list[tf.Variable]:
        own = {v.ref() for v in self.compression_variables()}
        return [v for v in self.trainable_variables if v.ref() not in own]

    def fit(self, *args, callbacks=None, **kwargs):
        drives = any(getattr(cb, "drives_compression", False) for cb in callbacks or [])
        if not drives and not self.search_finished():
            raise ValueError(
                f"{self._searching()}: add callbacks=[tfhybrid.CompressionScheduler()] to "
                "fit(), which takes the search's hard decisions when its last step comes."
            )
        self._build_optimizers()
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def _build_optimizers(self) -> None:
        """Creates both optimizers' slots before `fit` traces.

        Keras creates them inside the first traced training step, and a `tf.function`
        that created variables is traced a second time: the search's graph (masks,
        factored layers, budget, and an optimizer update for each of their variables)
        would be built twice, which on DenseNet121 costs about a minute.
        """
        pairs = (
            (self.optimizer, self._weights_of_user_optimizer()),
            (self.compression_optimizer, self.compression_variables()),
        )
        with self.distribute_strategy.scope():
            for optimizer, variables in pairs:
                if isinstance(optimizer, keras.optimizers.Optimizer):  # legacy ones build later
                    optimizer.build(variables)  # a no-op once built

    def train_on_batch(self, *args, **kwargs):
        if not self.search_finished():
            raise ValueError(
                f"{self._searching()}, and train_on_batch cannot take the search's "
                "decisions at its end: train it with fit(..., "
                "callbacks=[tfhybrid.CompressionScheduler()])."
            )
        return super().train_on_batch(*args, **kwargs)

    # -- the search's end and the plan -------------------------------------------------
    def finish_search(self) -> None:
        """Makes every technique's decisions hard (projected onto the budget); from then
        on the model computes with them (each technique layer's `decided` flag).

        A technique's layers are decided as soon as it finishes, so the next technique
        finishes with its decisions as they stay (Unify lays its blocks over DF's kept
        channels, say)."""
        for technique in self._held.techniques:
            technique.finish(self)
            for layer in technique.layers_of(self):
                layer.decided.assign(1)
        self._warn_if_over_budget()

    def _warn_if_over_budget(self) -> None:
        """Warns, naming each target, where the decided model keeps more than the budget:
        the budget asks for a cut none of the techniques makes (e.g. `bits` with only
        channel removal, or LC parts fixed at more bits than the budget)."""
        kept = {k: float(v) for k, v in self.ratios(hard=True).items()}
        over = {
            name: target
            for name, target in self.budget.targets().items()
            if name in kept and kept[name] > target * (1 + 1e-3)
        }
        if over:
            figures = ", ".join(f"{k} {kept[k]:.4f} (budget {v:g})" for k, v in over.items())
            names = [t.name for t in self._held.techniques]
            warnings.warn(
                f"The search of model '{self.name}' ended over its budget: {figures}. The "
                f"techniques {names} cut no further there; add one that does (e.g. th.Sparse "
                "or th.Cluster for bits, th.DF for MACs) or ask them for more (a smaller "
                "share, fewer bits).",
                stacklevel=2,
            )

    def plan(self) -> plan.Plan:
        """Every technique's decisions for `strip`, merged (mid-search: the current ones,
        projected onto the budget; the model is not modified)."""
        return plan.merge(t.plan(self) for t in self._held.techniques)

    def get_config(self) -> dict:
        network = keras_functional.get_network_config(self)
        return {**network, "compression": self._compression}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        compression = config.pop("compression")
        inputs, outputs, _ = keras_functional.reconstruct_from_config(config, custom_objects)
        return cls(inputs, outputs, compression, name=config.get("name"))


@keras.utils.register_keras_serializable(package="tfhybrid")
class HybridModel(CompressionModel):
    """The name models saved by earlier versions carry (DF alone); loads as before."""


def _techniques_of(settings: dict) -> list[dict]:
    """The techniques' configs; settings saved before techniques were plug-ins hold DF's
    options at the top."""
    if "techniques" in settings:
        return settings["techniques"]
    return [{"name": "df", "config": {"round_to": settings.get("round_to", 1)}}]


def _straight_through(hard_value, soft_value):
    """`hard_value` in value, with `soft_value`'s gradient."""
    return soft_value + tf.stop_gradient(hard_value - soft_value)


def _in_current_graph(tensor: tf.Tensor) -> bool:
    """True if `tensor` belongs to the function being traced now (never when eager)."""
    return (
        tf.inside_function() and getattr(tensor, "graph", None) is tf.compat.v1.get_default_graph()
    )


def refuse_search_model(model: Any, call: str) -> None:
    """Raises if `model` is still a compression model: `call` needs the stripped one.

    Raises:
        ValueError: naming the model and the call to make instead.
    """
    if isinstance(model, CompressionModel):
        raise ValueError(
            f"Model '{model.name}' is a tfhybrid search model (channel gates, factored "
            f"layers); {call} needs the plain model: {call}(tfhybrid.strip(model), ...)."
        )
