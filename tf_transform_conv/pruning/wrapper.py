"""`PruningWrapper`: the one protocol every pruning wrapper follows.

The step callbacks, `strip_model`, cost accounting and export treat every
pruning wrapper alike through this base class: `TransformPruning` (filters
rebuilt from bases), `MagnitudePruning` and `InterspacePruning` (unstructured
masks) all derive from it, and so can a user's own wrapper.
"""

import contextlib
import sys
import warnings

import keras

from tf_transform_conv.pruning.schedules import check_schedule
from tf_transform_conv.pruning.schedules import deserialize_schedule
from tf_transform_conv.pruning.schedules import evaluate_schedule
from tf_transform_conv.pruning.schedules import serialize_schedule

__all__ = ["FrozenLayerWarning", "PruningWrapper", "frozen_layers_checked"]


class FrozenLayerWarning(UserWarning):
    """A pruning wrapper holds a layer with `trainable=False`: the schedule prunes it, nothing trains."""


_FROZEN_ADVICE = (
    "(trainable=False): the schedule will prune {them}, and nothing will train to "
    "make up for it. Set `layer.trainable = True` on each before wrapping "
    "(keras.distillation.Distiller freezes its teacher, and "
    "keras.models.clone_model copies each layer's flag; on TensorFlow, "
    "`model.trainable = True` on such a clone does nothing, as the clone's own "
    "flag already reads True)."
)


def _user_stacklevel():
    """The `stacklevel` of the first caller outside this package, Keras and contextlib."""
    frame, level = sys._getframe(1), 1  # the frame calling warnings.warn
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
            "tf_transform_conv", "keras", "contextlib"):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def frozen_layers_checked(layers, verb):
    """Warns once about every frozen layer a verb wraps; its wrappers stay quiet within.

    Args:
        layers: the layers the verb is about to wrap.
        verb: the verb's name, for the message.
    """
    names = [layer.name for layer in layers if not layer.trainable]
    if names:
        listed = ", ".join(repr(name) for name in names)
        warnings.warn(
            f"{verb}: {listed} {'is' if len(names) == 1 else 'are'} not trainable "
            + _FROZEN_ADVICE.format(them="it" if len(names) == 1 else "them"),
            FrozenLayerWarning, stacklevel=_user_stacklevel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenLayerWarning)
        yield


class PruningWrapper(keras.layers.Wrapper):
    """Base class of the pruning wrappers: a layer trained under a pruning schedule.

    What the package relies on, for every subclass:

    - The step callback (`UpdateTransformPruningStep`, or
      `update_pruning_step` in a custom loop) evaluates each wrapper's
      schedule before every training batch. A wrapper with
      `allocation == "per_layer"` whose schedule says to prune gets
      `prune_to(sparsity, step, scores=...)`; the wrappers with
      `allocation == "global"` are pruned together (`prune_globally`, through
      `saliency(scores)` and `prune_to(step=..., scores=..., count=...)`).
      Then every wrapper gets `after_step()` and its `pruning_step` is set.
      `criterion == "taylor"` asks the callback for first-order scores.
    - `strip()` gives the plain layer that computes what the wrapper
      computes, and its weights; `strip_model` puts it in the wrapper's
      place.
    - `summary_scalars()` is what `TransformPruningSummaries` writes.
    - `call` starts with `self.check_step_callback(training)`: training
      without the step callback fails loudly, naming it.
    - Export refuses a model that still holds a wrapper (strip it first),
      and cost accounting finds each subclass's rule in the cost registry
      (`cost.register_layer_cost`).

    Subclasses implement `call`, `sparsity`, `prune_to` and `strip`, and may
    override `criterion`, `allocation`, `after_step`, `saliency` and
    `summary_scalars`; `build` must call `super().build(input_shape)` first,
    which builds the wrapped layer and the `pruning_step` weight.

    Args:
        layer: the layer to wrap.
        schedule: a callable `schedule(step) -> (should_prune: bool,
            sparsity: float in [0, 1))`: tfmot's `PolynomialDecay` and
            `ConstantSparsity` as they are, a function, or an object with
            `__call__(self, step)`; or the config `serialize_schedule` saved.
            What it returns is checked at each evaluation.
        **kwargs: base layer arguments (`name`, ...).

    Attributes:
        schedule: the schedule.
        pruning_step: int32 weight, the last step the callback ran (-1
            before the first); saved with the model, so a resumed run
            continues from it.
        step_callback_attached: bool, set by the step callback while it
            drives the wrapper.
        pruning_history: list of dicts, one per pruning step (at least
            `"step"` and `"sparsity"`).
    """

    #: What ranks the weights: `"taylor"` asks the step callback for data-based scores.
    criterion = "magnitude"
    #: `"per_layer"` (the wrapper prunes itself) or `"global"` (pruned with the others).
    allocation = "per_layer"

    def __init__(self, layer, schedule, **kwargs):
        super().__init__(layer, **kwargs)
        if isinstance(schedule, dict):
            schedule = deserialize_schedule(schedule)
        check_schedule(schedule)
        if not layer.trainable:
            warnings.warn(
                f"{type(self).__name__}: '{layer.name}' is not trainable "
                + _FROZEN_ADVICE.format(them="it"), FrozenLayerWarning,
                stacklevel=_user_stacklevel())
        self.schedule = schedule
        self.step_callback_attached = False
        self.pruning_history = []

    def build(self, input_shape):
        super().build(input_shape)
        self.pruning_step = self.add_weight(
            name="pruning_step", shape=(), dtype="int32", initializer="zeros",
            trainable=False,
        )
        self.pruning_step.assign(-1)

    def check_step_callback(self, training):
        """Raises the error naming the missing step callback when training without it."""
        if training and not self.step_callback_attached:
            raise ValueError(
                f"Layer '{self.name}' is being trained without its pruning "
                "step callback. Pass "
                "`callbacks=[tf_transform_conv.UpdateTransformPruningStep()]` to "
                "`model.fit` (or, in a custom loop, call "
                "`update_pruning_step(model, step)` before each batch)."
            )

    @property
    def sparsity(self):
        """The fraction of the wrapped layer's units (filters, weights) pruned now."""
        raise NotImplementedError(f"{type(self).__name__} does not define `sparsity`.")

    def prune_to(self, sparsity=None, step=None, scores=None, count=None):
        """Prunes to `sparsity` (or, for a global wrapper, to `count` kept units) at `step`."""
        raise NotImplementedError(f"{type(self).__name__} does not define `prune_to`.")

    def decision(self, step):
        """`(should_prune, sparsity)` at `step`: the schedule's, checked (`evaluate_schedule`).

        The step callback asks each per-layer wrapper through this method, so
        a wrapper may decide otherwise (an M-by-N `MagnitudePruning` prunes
        at step 1 only).
        """
        return evaluate_schedule(self.schedule, step)

    def saliency(self, scores=None):
        """Per-unit saliencies for a global ranking (wrappers with `allocation="global"`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no global allocation: it prunes per layer.")

    def after_step(self):
        """Runs after every step, pruned or not (masks write their zeros back here)."""

    def strip(self):
        """The layer computing what this wrapper computes, and its weights: `(layer, weights)`.

        Build the layer (call it on an input, or `layer.build(input_shape)`),
        then `layer.set_weights(weights)`; `strip_model` does this for every
        wrapper of a Sequential or Functional model.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define `strip`.")

    def summary_scalars(self):
        """`{name: float}` written to TensorBoard by `TransformPruningSummaries`."""
        return {"sparsity": self.sparsity}

    def update(self, step, scores=None):
        """Runs the schedule at `step`, prunes when it says so, then `after_step()`.

        A global wrapper only records the step: `update_pruning_step` prunes
        all of a model's global wrappers together.

        Returns:
            Whether the schedule said to prune at `step`.
        """
        should_prune, sparsity = self.decision(step)
        if should_prune and self.allocation == "per_layer":
            self.prune_to(sparsity, step, scores=scores)
        self.after_step()
        self.pruning_step.assign(step)  # after pruning: a failed step is not skipped
        return should_prune

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["schedule"] = serialize_schedule(self.schedule)
        return config
