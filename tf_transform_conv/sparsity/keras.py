"""tfmot's `tfmot.sparsity.keras` for Keras 3: the same names, on this package's pruning.

A script written for tensorflow-model-optimization runs here with its import
changed (`import tf_transform_conv as tfmot`, or `from tf_transform_conv
import sparsity` for `tfmot.sparsity`): `prune_low_magnitude` with tfmot's
arguments, `strip_pruning`, `UpdatePruningStep`, `PruningSummaries`,
`prune_scope`, `PrunableLayer`, `PolynomialDecay`, `ConstantSparsity`,
`PruningPolicy` and `PruneForLatencyOnXNNPack`. Nothing here is a second
implementation: the wrappers are `pruning.MagnitudePruning`, the schedules
and callbacks those of `pruning`. What differs from tfmot is listed in the
guide "Coming from tfmot".
"""

import keras

from tf_transform_conv.graph.nodes import check_graph_model
from tf_transform_conv.pruning.callbacks import PruningSummaries
from tf_transform_conv.pruning.callbacks import UpdatePruningStep
from tf_transform_conv.pruning.magnitude import MagnitudePruning
from tf_transform_conv.pruning.magnitude import sp_skip_reason
from tf_transform_conv.pruning.policy import PruneForLatencyOnXNNPack
from tf_transform_conv.pruning.policy import PruningPolicy
from tf_transform_conv.pruning.prunable import PrunableLayer
from tf_transform_conv.pruning.prune import prune_low_magnitude as _prune_low_magnitude
from tf_transform_conv.pruning.prune import strip_model
from tf_transform_conv.pruning.schedules import ConstantSparsity
from tf_transform_conv.pruning.schedules import PolynomialDecay

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneForLatencyOnXNNPack",
    "PruningPolicy",
    "PruningSummaries",
    "UpdatePruningStep",
    "prune_low_magnitude",
    "prune_scope",
    "strip_pruning",
]


def _tfmot_prunes(layer):
    """tfmot's choice of layers in a model: `Conv2D` and `Dense` kernels and `PrunableLayer`s.

    tfmot leaves `DepthwiseConv2D` dense (its registry names no weight to
    prune); this package's own `prune_low_magnitude` prunes it.
    """
    return not isinstance(layer, keras.layers.DepthwiseConv2D) and not sp_skip_reason(layer)


def prune_low_magnitude(to_prune, pruning_schedule=None, block_size=(1, 1),
                        block_pooling_type="AVG", pruning_policy=None, sparsity_m_by_n=None,
                        **kwargs):
    """tfmot's `prune_low_magnitude` on Keras 3: wraps a layer, a list of layers or a model.

    Args:
        to_prune: a layer (returns its `MagnitudePruning` wrapper), a list
            of layers (returns the list, each prunable layer wrapped), or a
            built Sequential or Functional model (returns a new model: its
            `Conv2D`, `Dense` and `PrunableLayer` layers wrapped, as tfmot
            chooses; `DepthwiseConv2D` stays dense, as in tfmot, unless
            passed alone).
        pruning_schedule: a schedule; None (default) is tfmot's default,
            `ConstantSparsity(0.5, 0)`.
        block_size: `(height, width)` blocks, `(1, 1)` (default) for none.
        block_pooling_type: `"AVG"` (default) or `"MAX"`.
        pruning_policy: a `PruningPolicy` (for a model): it checks the
            model first, then chooses the layers to wrap.
        sparsity_m_by_n: None or `(m, n)`: `m` zeros in every `n`
            consecutive weights, made at step 1.
        **kwargs: for a single layer, base layer arguments of the wrapper.

    Returns:
        The wrapper, the list, or the new model. Train with
        `UpdatePruningStep()` among the callbacks, then `strip_pruning`.

    Raises:
        ValueError: for anything else to prune, an invalid argument, or a
            model the policy refuses.

    Example:

    >>> import keras
    >>> from tf_transform_conv import sparsity
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> pruned = sparsity.prune_low_magnitude(
    ...     model, pruning_schedule=sparsity.ConstantSparsity(0.5, 0), sparsity_m_by_n=(2, 4))
    >>> type(pruned.layers[0]).__name__
    'MagnitudePruning'
    """
    schedule = pruning_schedule if pruning_schedule is not None else ConstantSparsity(0.5, 0)
    pattern = dict(block_size=block_size, block_pooling_type=block_pooling_type,
                   sparsity_m_by_n=sparsity_m_by_n)
    if isinstance(to_prune, (list, tuple)):
        return [layer if isinstance(layer, (MagnitudePruning, keras.layers.InputLayer))
                or sp_skip_reason(layer)
                else _prune_low_magnitude(layer, schedule, **pattern)
                for layer in to_prune]
    if isinstance(to_prune, keras.Model):
        check_graph_model(to_prune, "prune_low_magnitude")
        if pruning_policy is not None:
            if not isinstance(pruning_policy, PruningPolicy):
                raise ValueError(
                    "Invalid value for argument `pruning_policy`. Expected None or a "
                    "PruningPolicy (e.g. PruneForLatencyOnXNNPack()). Received "
                    f"pruning_policy={pruning_policy!r}.")
            pruning_policy.ensure_model_supports_pruning(to_prune)

        def chosen(layer):
            return _tfmot_prunes(layer) and (
                pruning_policy is None or pruning_policy.allow_pruning(layer))

        return _prune_low_magnitude(to_prune, schedule, layers=chosen, **pattern)
    if isinstance(to_prune, keras.layers.Layer):
        if isinstance(to_prune, MagnitudePruning):
            return to_prune
        if kwargs:
            return MagnitudePruning(to_prune, schedule, **pattern, **kwargs)
        return _prune_low_magnitude(to_prune, schedule, **pattern)
    raise ValueError(
        "`prune_low_magnitude` prunes a keras.layers.Layer, a list of layers, or a "
        f"Sequential or Functional model. Received {type(to_prune).__name__}.")


def strip_pruning(model):
    """tfmot's `strip_pruning`: every wrapper replaced by its plain layer (`strip_model`).

    Raises:
        ValueError: if `model` is not a Sequential or Functional Keras model.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected model to be a `keras.Model` instance. Received {type(model).__name__}.")
    return strip_model(model)


def prune_scope():
    """tfmot's `prune_scope`: a custom-object scope holding the pruning classes.

    Not needed on Keras 3 (the classes are registered, and `.keras` files
    load with `keras.saving.load_model`, `safe_mode=True`); kept for scripts
    that use it as tfmot's `with prune_scope(): load_model(...)`.
    """
    return keras.saving.custom_object_scope({
        "PruneLowMagnitude": MagnitudePruning, "MagnitudePruning": MagnitudePruning,
        "PolynomialDecay": PolynomialDecay, "ConstantSparsity": ConstantSparsity,
    })
