"""The technique interface: what every compression method plugs in, and its registry.

A technique (DF's masks and ranks, TF-MOT pruning, ...) is a small object holding its
options. `hybrid_compress` asks each technique which layers it takes, lets it wrap
them in its training-time layers while the model is rebuilt once, and returns a
`CompressionModel` that sums the techniques' losses and decisions under one budget.
During `fit` the model calls each technique's hooks; at `strip` each technique
states its decisions as a `plan.Plan`, and `surgery` carries out the merged plan.

A technique never rebuilds a graph and keeps no state of its own between calls: its
variables live in the layers it made (saved with the model), and every method that
needs them receives the compression model. Register a technique of your own with
`register_technique` so a saved model finds it again (see docs/techniques.md).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import threading
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from tfhybrid import channels, graph, plan

_REGISTRY: dict[str, type] = {}


@dataclasses.dataclass
class Setup:
    """What a technique sees when `hybrid_compress` sets it up.

    Attributes:
        analysis: `channels.analyze` of the original model (its `model` is flattened).
        budget: the shared `Budget`.
        cost_model: `cost.CostModel` of the original model.
        original: {"macs", "params", "bits"} of the original model (`CostModel.costs`).
        layers: names the user restricted compression to (empty: all).
        skip: names the user excluded.
        named: names given in `layers` (not through a nested model's name), whose
            exclusions are warned of.
        temperature: config of the soft decisions' temperature schedule (`schedules`).
    """

    analysis: Any
    budget: Any
    cost_model: Any
    original: dict
    layers: set
    skip: set
    named: set
    temperature: dict

    def allowed(self, name: str) -> bool:
        """Whether the user's `layers`/`skip` let a technique take layer `name`."""
        return name not in self.skip and (not self.layers or name in self.layers)

    def restricted(self, option: str, layers: list, skip: list) -> tuple[set, set]:
        """(layers, skip) with a technique's own `layers=`/`skip=` options added.

        Raises:
            ValueError: for a name that is neither a layer nor a nested model.
        """
        own = expand_names(self.analysis, f"{option}(layers=...)", layers)
        only = (self.layers & own if self.layers else own) if layers else self.layers
        return only, self.skip | expand_names(self.analysis, f"{option}(skip=...)", skip)


@dataclasses.dataclass
class Decisions:
    """A technique's decisions as the cost model counts them (numbers or tensors).

    Attributes:
        counts: channel group id -> channels kept.
        ranks: layer name -> rank of its kernel.
        densities: layer name -> share of its kernel's weights that are non-zero.
        bits: layer name -> (bits of each kernel entry's index, values in its table),
            for kernels that share a few values (see `cost.CostModel.costs`).
        tucker: layer name -> (r1, r2), a conv kept as a Tucker-2 chain.
        blocks: layer name -> (weights per block, share of blocks unified, share pruned),
            for kernels cut into blocks of one magnitude (see `cost.CostModel.costs`).
        lowrank_sparse: layer name -> (rank, density), a kernel kept as a low-rank pair
            plus a parallel sparse kernel (see `cost.CostModel.costs`).
        stored: layer name -> (non-zero parameters, bits) of its kernel as a technique
            stores it (see `cost.CostModel.costs`).
    """

    counts: dict = dataclasses.field(default_factory=dict)
    ranks: dict = dataclasses.field(default_factory=dict)
    densities: dict = dataclasses.field(default_factory=dict)
    bits: dict = dataclasses.field(default_factory=dict)
    tucker: dict = dataclasses.field(default_factory=dict)
    blocks: dict = dataclasses.field(default_factory=dict)
    lowrank_sparse: dict = dataclasses.field(default_factory=dict)
    stored: dict = dataclasses.field(default_factory=dict)

    def merged(self, other: Decisions) -> Decisions:
        """Both techniques' decisions (their layers and groups are disjoint)."""
        fields = [f.name for f in dataclasses.fields(self)]
        return Decisions(**{f: {**getattr(self, f), **getattr(other, f)} for f in fields})

    def costed_by(self, cost_model: Any) -> dict:
        """{"macs", "params", "bits"} of these decisions (`cost.CostModel.costs`)."""
        return cost_model.costs(
            self.counts,
            self.ranks,
            self.densities,
            self.bits,
            self.tucker,
            self.blocks,
            self.lowrank_sparse,
            self.stored,
        )


class Technique(abc.ABC):
    """One compression method under the shared budget.

    Subclasses set `name` (their registry key), keep their options as attributes,
    and implement `get_config`, `select`, `layers_of` and `plan`; the other hooks
    default to doing nothing.
    """

    name: ClassVar[str] = ""

    # -- options ---------------------------------------------------------------------
    @abc.abstractmethod
    def get_config(self) -> dict:
        """The options, JSON-able; `from_config` rebuilds the technique from them."""

    @classmethod
    def from_config(cls, config: dict) -> Technique:
        return cls(**config)

    # -- set-up, on the original model -------------------------------------------------
    @abc.abstractmethod
    def select(self, setup: Setup) -> dict[str, str]:
        """Decides which layers and groups this technique takes.

        Args:
            setup: the original model's analysis, the budget and the user's restrictions.

        Returns:
            layer name -> what the technique does to it ("channels", "rank", "weights"),
            for the layers whose weights it changes. Two techniques that claim one layer
            are refused unless both only thin its channels.

        Raises:
            ValueError: if it can take nothing, with the reason per layer or group.
        """

    def prepare(self, setup: Setup, others: list[Technique]) -> None:  # noqa: B027
        """Called once every technique has selected, before the model is rebuilt (e.g.
        to fit its searched ranks under the budget the others leave)."""

    def replace_layer(self, op: graph.Op) -> graph.Replacement | None:
        """A training-time stand-in for `op`'s layer (a factored layer, a pruning
        wrapper), or None to keep a copy of it."""
        return None

    def wrap_outputs(self, op: graph.Op, call: graph.Replacement) -> graph.Replacement:
        """`call` (the layer or its stand-in) with this technique's ops on its outputs
        (e.g. channel masks); `call` itself when it adds none."""
        return call

    def initialize(self, model: Any, original: Any) -> None:  # noqa: B027
        """Sets initial values once the compression model exists (e.g. mask logits
        from the original weights)."""

    # -- training, on the compression model -------------------------------------------
    @abc.abstractmethod
    def layers_of(self, model: Any) -> list:
        """This technique's training-time layers in `model`."""

    def compression_variables(self, model: Any) -> list[tf.Variable]:
        """Variables that the framework's compression optimizer updates (never the
        user's optimizer): mask logits, thresholds, latents."""
        return []

    def decisions(self, model: Any, hard: bool = False) -> Decisions:
        """The technique's current decisions as costs count them: soft (tensors, with
        gradients to its variables) or hard."""
        return Decisions()

    def kept_channels(self, model: Any) -> dict:
        """Eagerly, for a technique that removes channels: channel group id -> bool array
        of the channels `strip` keeps now (others may fit their own decisions to it)."""
        return {}

    def loss(self, model: Any) -> tf.Tensor | None:
        """A loss term of its own (beside the shared budget penalty), or None."""
        return None

    def set_search_steps(self, model: Any, steps: int) -> None:  # noqa: B027
        """The search's length is known (given, or set by the first fit): stretch the
        schedules that follow it (temperatures, sparsity ramps)."""

    def before_step(self, model: Any, step: tf.Tensor) -> None:  # noqa: B027
        """In the training step's graph, before the forward pass (`step`: the batch)."""

    def after_step(self, model: Any) -> None:  # noqa: B027
        """In the training step's graph, after the update (e.g. advance its counters)."""

    def search_done(self, model: Any) -> bool:
        """Eagerly, after each batch of the search: True once this technique's search has
        reached its end by a rule of its own (DHP: the budget is met). The search ends
        early when every technique says so; by default it lasts its `search_steps`."""
        return False

    def on_epoch_end(self, model: Any, epoch: int) -> None:  # noqa: B027
        """Eagerly, after each epoch of a `fit` driven by `CompressionScheduler` (e.g. an
        LC C step, an ADMM Z/U update)."""

    def finish(self, model: Any) -> None:  # noqa: B027
        """At the search's end (eagerly, between batches): make the decisions hard."""

    @abc.abstractmethod
    def plan(self, model: Any) -> plan.Plan:
        """The decisions as a plan for `surgery.strip` (current ones, mid-search)."""

    def scalars(self, model: Any) -> dict[str, float]:
        """Figures for `CompressionLogger` (tag -> value), e.g. kept channels per group."""
        return {}


def expand_names(analysis: Any, option: str, names) -> set:
    """Layer names given as an option, a nested model's name standing for all its
    layers, checked against the analysed model.

    Raises:
        ValueError: for a name that is neither a layer nor a nested model of the model,
            with the closest name.
    """
    expanded = {n for name in names for n in analysis.nested.get(name, [name])}
    known = [layer.name for layer in analysis.model.layers]
    unknown = sorted(expanded - set(known))
    if not unknown:
        return expanded
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known + list(analysis.nested), n=1)
        hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ValueError(
        f"{option} names {', '.join(hints)}, neither a layer nor a nested model of model "
        f"'{analysis.model.name}'. Use the names `model.summary()` shows, or those of a "
        "nested model's layers."
    )


def register_technique(cls: type) -> type:
    """Class decorator: makes a technique known by its `name` to saved models.

    Raises:
        ValueError: if `cls` has no name or the name is taken by another class.
    """
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"Technique {cls.__name__} needs a class attribute `name`.")
    if _REGISTRY.get(name, cls) is not cls and _REGISTRY[name].__qualname__ != cls.__qualname__:
        raise ValueError(
            f"A technique named '{name}' is registered already ({_REGISTRY[name].__name__})."
        )
    _REGISTRY[name] = cls
    return cls


def serialize(technique: Technique) -> dict:
    """A JSON-able description of `technique`."""
    return {"name": technique.name, "config": technique.get_config()}


def deserialize(config: dict) -> Technique:
    """The technique `serialize` described.

    Raises:
        ValueError: for a technique name nobody registered.
    """
    name = config["name"]
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown technique '{name}': known are {sorted(_REGISTRY)}. Import the module "
            "that registers it (tfhybrid.register_technique) before loading the model."
        )
    return _REGISTRY[name].from_config(dict(config["config"]))


def kept_kernel_channels(model: Any) -> dict[str, tuple]:
    """Eagerly: layer name (and `<layer>/<part>` for each kernel of a layer with several,
    see `cost.LayerTerms.key`) -> (input, output) channels of its kernel that `strip` keeps,
    after every technique's `kept_channels` (None where an axis keeps all), for a
    technique that decides its weights within what the others keep."""
    keep = {gid: np.flatnonzero(kept) for gid, kept in model.kept_channels().items()}
    sizes = model.cost_model.sizes
    return {
        key: (
            channels.channel_indices(t.inputs, keep, sizes),
            channels.channel_indices(t.outputs, keep, sizes),
        )
        for t in model.cost_model.terms
        for key in {t.name, t.key}
    }


def add_search_state(layer: Any) -> None:
    """Gives a training-time layer its `step` (batches trained) and `decided` (1 once
    the search's decisions are hard) counters, as every technique layer has.

    The compression model advances every `step` in its training step and sets every
    `decided` at the search's end; under a distribution strategy the first replica's
    update counts. Call it from the layer's `build`.
    """
    for name in ("step", "decided"):
        variable = layer.add_weight(
            name,
            shape=(),
            dtype=tf.int64,
            initializer="zeros",
            trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        setattr(layer, name, variable)


class SharedWithinAStep:
    """Mixin for layers whose decision tensors (masks, gates) are read many times per step.

    One training step may read a mask many times: every tensor of a channel group is
    masked (a DenseNet concatenation carries up to ~60 groups into each later layer
    of its block), and the budget counts each mask and gate again. Built per read,
    DenseNet121's training graph took minutes to trace. Inside `shared_decisions`,
    which the compression model opens around a forward pass or a whole train/test
    step, `_memo(key, build)` builds each once: the step sits wholly inside or outside
    one gradient tape, so the shared tensors carry their gradients. Per thread, as
    MirroredStrategy runs its replicas in threads of one graph.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shared = threading.local()

    def _memo(self, key, build):
        shared = getattr(self._shared, "values", None)
        if shared is None:
            return build()
        if key not in shared:
            shared[key] = build()
        return shared[key]

    def _memoized(self, key):
        """The value built for `key` in this step, or None (none built, or no step)."""
        return (getattr(self._shared, "values", None) or {}).get(key)

    @contextlib.contextmanager
    def shared_decisions(self):
        """Within it (nested: the outermost), each decision tensor is built once."""
        if getattr(self._shared, "values", None) is not None:
            yield
            return
        self._shared.values = {}
        try:
            yield
        finally:
            self._shared.values = None
