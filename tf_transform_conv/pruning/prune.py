"""The pruning verbs: wrap a model's layers for pruning, and strip the wrappers afterwards.

`prune_model` wraps chosen `Conv2D` layers in `TransformPruning` (filters
rebuilt from bases); `prune_low_magnitude` and `prune_interspace` wrap layers
in the unstructured wrappers (`MagnitudePruning`, `InterspacePruning`), a
layer or a whole model; `strip_model` replaces every `PruningWrapper` by
the plain layer it trained (`PruningWrapper.strip`).
"""

import warnings

import keras

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.convert import nothing_rebuilt_error
from tf_transform_conv.convert import resolve_budget
from tf_transform_conv.graph.nodes import check_graph_model
from tf_transform_conv.graph.rewrite import rewrite_model
from tf_transform_conv.graph.rewrite import select_layers
from tf_transform_conv.graph.rewrite import unless_wrapped
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops.basis import BASES
from tf_transform_conv.pruning.interspace import InterspacePruning
from tf_transform_conv.pruning.interspace import ip_skip_reason
from tf_transform_conv.pruning.magnitude import BLOCK_POOLING_TYPES
from tf_transform_conv.pruning.magnitude import MagnitudePruning
from tf_transform_conv.pruning.magnitude import check_block_size
from tf_transform_conv.pruning.magnitude import check_m_by_n
from tf_transform_conv.pruning.magnitude import sp_skip_reason
from tf_transform_conv.pruning.schedules import ScaledSchedule
from tf_transform_conv.pruning.schedules import check_schedule
from tf_transform_conv.pruning.schedules import final_sparsity
from tf_transform_conv.pruning.transform_pruning import TransformPruning
from tf_transform_conv.pruning.wrapper import PruningWrapper
from tf_transform_conv.pruning.wrapper import frozen_layers_checked
from tf_transform_conv.reconstruction import Reconstruction
from tf_transform_conv.reconstruction import shape_skip_reason

__all__ = ["prune_interspace", "prune_low_magnitude", "prune_model", "strip_model"]


def prune_model(model, schedule, reconstruction=None, layers=None, budget=None):
    """Wraps chosen `Conv2D` layers of a Sequential or Functional model in `TransformPruning`.

    Args:
        model: a built Sequential or Functional Keras model (not a path:
            load it with `keras.saving.load_model` first).
        schedule: the pruning schedule, a callable `schedule(step) ->
            (should_prune, sparsity)`: tfmot `PolynomialDecay`,
            `ConstantSparsity`, a function or an object with `__call__`.
        reconstruction: a `Reconstruction` (transforms, family, criterion,
            assignment, scale, depth groups, allocation, minimum bases), or
            None for its defaults. Every wrapper gets it as it is, except
            `depth_groups`, which is 1 for a layer whose input channels it
            does not divide (`Reconstruction.for_layer`, as `conv_factory`
            does); with `allocation="global"` the wrapped layers are pruned
            together, to one ranking.
        layers: which layers: None (every `Conv2D` with `groups=1` and a
            kernel larger than 1x1), a list of names, a layer class, or a
            predicate `layer -> bool`.
        budget: optional `budget.Budget` (planned here on the model's
            current weights, without data) or `budget.BudgetPlan` (from
            `budget.plan_budget`): only the layers the plan converts are
            wrapped, each with `schedule` scaled to end at its own sparsity
            (`pruning.schedules.ScaledSchedule`; the schedule then gives the
            timing and must state its final sparsity, as tfmot's schedules
            do). Only with `allocation="per_layer"`.

    Returns:
        A new model with the same weights; train it with
        `UpdateTransformPruningStep` among the callbacks.

    Raises:
        ValueError: before anything is wrapped, for any invalid argument
            (the message names it and what is allowed), something other than
            a built Sequential or Functional model, or a layer name that
            matches no eligible layer; and when no layer gets wrapped (the
            message lists the model's convolutions and why each was left).

    Example:

    >>> import keras
    >>> import tf_transform_conv as tc
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3)])
    >>> pruned = tc.prune_model(model, lambda step: (step == 0, 0.75),
    ...                         tc.Reconstruction(transforms="rotations"))
    >>> [type(layer).__name__ for layer in pruned.layers]
    ['TransformPruning']
    """
    check_graph_model(model, "prune_model")
    check_schedule(schedule)
    reconstruction = Reconstruction.get(reconstruction)
    layer_schedule = {}
    if budget is not None:
        if reconstruction.allocation != "per_layer":
            raise ValueError(
                "`budget` chooses each layer's bases itself: use allocation='per_layer'. "
                f"Received allocation={reconstruction.allocation!r}."
            )
        final = final_sparsity(schedule)
        if not final:
            raise ValueError(
                "With `budget`, the schedule gives the timing and each layer's sparsity "
                "comes from the plan: the schedule must state a final sparsity > 0 "
                "(tfmot PolynomialDecay / ConstantSparsity, or a `final_sparsity` "
                f"attribute). Received schedule={schedule!r}."
            )
        plan = resolve_budget(budget, model, reconstruction, layers)
        for choice in plan.choices:
            if choice.bases is not None:
                sparsity = (choice.filters - choice.bases) / choice.filters
                layer_schedule[choice.name] = ScaledSchedule(schedule, sparsity / final)
        layers = sorted(layer_schedule) or (lambda layer: False)
    reason = unless_wrapped(model, reconstruction.skip_reason)
    chosen = select_layers(model, layers, reason)
    if layers is None:
        _warn_if_transforms_skip(model, reconstruction)
    chosen_layers = [layer for layer in _compat.layers_of(model) if layer.name in chosen]
    reconstruction.warn_if_min_bases_keep_all(chosen_layers, "prune_model")
    wrapped = []

    def replace(layer):
        if layer.name not in chosen:
            return None
        wrapper = TransformPruning(
            _copy(layer), layer_schedule.get(layer.name, schedule),
            reconstruction.for_layer(layer),
        )
        wrapped.append(layer.name)
        return wrapper, None

    with frozen_layers_checked(chosen_layers, "prune_model"):
        new_model = rewrite_model(model, replace)
    if not wrapped:
        raise nothing_rebuilt_error("prune_model", "wrapped", model, reason)
    return new_model


def _warn_if_transforms_skip(model, reconstruction):
    """Warns about the convolutions that `prune_model` leaves only because the
    reconstruction's transforms do not apply to their kernels."""
    reasons = {
        layer.name: reconstruction.skip_reason(layer)
        for layer in _compat.layers_of(model)
        if isinstance(layer, keras.layers.Conv2D)
        and not shape_skip_reason(layer.kernel_size, layer.groups, "identity")
    }
    left = {name: why for name, why in reasons.items() if why}
    if left:
        warnings.warn(
            f"prune_model leaves {', '.join(f'{n!r} ({why})' for n, why in left.items())} "
            f"dense: transforms={list(reconstruction.transforms)} do not apply to "
            f"{'its kernel' if len(left) == 1 else 'their kernels'}. Pass transforms that "
            "do (e.g. 'flips' or 'identity' for a non-square kernel), or name the layers "
            "to prune with `layers`.",
            stacklevel=3,
        )


def _strip_subclassed_advice(model):
    found = [layer.name for layer in _compat.layers_of(model)
             if isinstance(layer, PruningWrapper)]
    return (
        "To strip the wrappers of a subclassed model, in its own code replace each "
        "wrapper attribute by its plain layer: `layer, weights = wrapper.strip()`, "
        "build the layer (call it on an input, or layer.build(input_shape)), then "
        f"`layer.set_weights(weights)`. Wrappers here: {found}."
    )


def strip_model(model):
    """Replaces every pruning wrapper by the plain layer it trained (`PruningWrapper.strip`).

    A `TransformPruning` becomes its compact `TransformConv2D`, a
    `MagnitudePruning` its plain layer with the masked kernel, an
    `InterspacePruning` a `FilterBasisConv2D` (or, of a `TransformConv2D`, a
    `FilterBasisTransformConv2D`).

    Args:
        model: a built Sequential or Functional model. For a subclassed
            model, replace each wrapper in its own code by the layer of
            `wrapper.strip()` (see there).

    Returns:
        A new model whose outputs equal the wrapped model's.
    """
    check_graph_model(model, "strip_model", subclassed_advice=_strip_subclassed_advice)
    return rewrite_model(
        model, lambda layer: layer.strip() if isinstance(layer, PruningWrapper) else None)


def _copy(layer):
    """A built copy of a built `Conv2D`, `DepthwiseConv2D`, `Dense` or `TransformConv2D`, weights included."""
    inner = layer.__class__.from_config(layer.get_config())
    inner.build(_input_shape_of(layer))
    inner.set_weights(layer.get_weights())
    return inner


def _input_shape_of(layer):
    """The build shape of a built `Conv2D`, `DepthwiseConv2D`, `Dense` or `TransformConv2D`
    (of another layer, such as a `PrunableLayer`, the shape it was built with)."""
    if isinstance(layer, TransformConv2D) or not isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        # The spatial size too: the layer picks its execution path from it.
        return tuple(layer.get_build_config()["input_shape"])
    if isinstance(layer, keras.layers.Dense):
        return (None, layer.kernel.shape[0])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        channels = layer.kernel.shape[2]
    else:
        channels = layer.kernel.shape[2] * layer.groups
    if layer.data_format == "channels_last":
        return (None, None, None, channels)
    return (None, channels, None, None)


def _wrap_model(model, verb, layers, skip_reason, make, what):
    check_graph_model(model, verb)
    chosen = select_layers(model, layers, unless_wrapped(model, skip_reason))
    wrapped = []

    def replace(layer):
        if layer.name not in chosen:
            return None
        wrapped.append(layer.name)
        return make(_copy(layer)), None

    with frozen_layers_checked(
            [layer for layer in _compat.layers_of(model) if layer.name in chosen],
            verb):
        new_model = rewrite_model(model, replace)
    if not wrapped:
        raise ValueError(
            f"{verb} wrapped no layer of model '{model.name}': it wraps {what} that "
            "`layers` chooses (and that no wrapper holds already)."
        )
    return new_model


def _to_prune(to_prune, verb):
    if isinstance(to_prune, keras.layers.Layer) and not isinstance(to_prune, keras.Model):
        return "layer"
    check_graph_model(to_prune, verb)
    return "model"


def prune_low_magnitude(to_prune, schedule, layers=None, block_size=(1, 1),
                        block_pooling_type="AVG", sparsity_m_by_n=None):
    """Magnitude pruning, tfmot's `prune_low_magnitude` for Keras 3: unstructured, blocks or M-by-N.

    Args:
        to_prune: a layer (`Conv2D`, `DepthwiseConv2D`, `Dense` or a
            `PrunableLayer`: returns its `MagnitudePruning` wrapper) or a
            built Sequential or Functional model (returns a new model in
            which the chosen layers are wrapped, with the same weights).
        schedule: a callable `schedule(step) -> (should_prune, sparsity)`:
            tfmot's `PolynomialDecay` / `ConstantSparsity` as they are, a
            function or an object with `__call__`.
        layers: for a model, which layers: None (every `Conv2D`,
            `DepthwiseConv2D`, `Dense` and `PrunableLayer`), a name or list
            of names, a layer class or a predicate `layer -> bool`.
        block_size: `(height, width)`: prune whole blocks of each kernel
            (`MagnitudePruning`), `(1, 1)` (default) entry by entry.
        block_pooling_type: `"AVG"` (default) or `"MAX"`, a block's score.
        sparsity_m_by_n: None (default) or `(m, n)`: `m` zeros in every
            `n` consecutive weights (2:4 is `(2, 4)`), made at step 1.

    Returns:
        The wrapper, or the new model; train it with
        `UpdateTransformPruningStep` among the callbacks, then
        `strip_model` it.

    Raises:
        ValueError: for an invalid schedule or `layers`, a layer it cannot
            wrap, something other than a layer or a built graph model, or
            a model in which no layer gets wrapped.

    Example:

    >>> import keras, numpy as np
    >>> import tf_transform_conv as tc
    >>> model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3),
    ...                           keras.layers.Flatten(), keras.layers.Dense(3)])
    >>> pruned = tc.prune_low_magnitude(model, lambda step: (step == 0, 0.5))
    >>> pruned.compile("sgd", "mse")
    >>> x, y = np.ones((8, 6, 6, 2), "float32"), np.zeros((8, 3), "float32")
    >>> _ = pruned.fit(x, y, verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
    >>> stripped = tc.strip_model(pruned)
    >>> [float(np.mean(l.kernel.numpy() == 0)) for l in stripped.layers if hasattr(l, "kernel")]
    [0.5, 0.5]
    """
    check_schedule(schedule)
    pattern = dict(block_size=check_block_size(block_size),
                   block_pooling_type=block_pooling_type,
                   sparsity_m_by_n=check_m_by_n(sparsity_m_by_n))
    if block_pooling_type not in BLOCK_POOLING_TYPES:
        raise ValueError(
            "Invalid value for argument `block_pooling_type`. Expected one of "
            f"{list(BLOCK_POOLING_TYPES)}. Received block_pooling_type={block_pooling_type!r}."
        )
    if _to_prune(to_prune, "prune_low_magnitude") == "layer":
        return MagnitudePruning(to_prune, schedule, **pattern)
    return _wrap_model(
        to_prune, "prune_low_magnitude", layers, sp_skip_reason,
        lambda inner: MagnitudePruning(inner, schedule, **pattern),
        "the keras.layers.Conv2D, DepthwiseConv2D and Dense layers and the PrunableLayers",
    )


def prune_interspace(to_prune, schedule, basis="standard", depth_groups=1, layers=None):
    """Interspace pruning: wraps `Conv2D` layers in `InterspacePruning`.

    Args:
        to_prune: a `Conv2D` (returns its `InterspacePruning` wrapper) or a
            built Sequential or Functional model (returns a new model in
            which the chosen convolutions are wrapped, with the same
            weights). Layers with a 1x1 kernel have a one-element basis:
            prune them with `prune_low_magnitude` (`layers=`) if wanted.
        schedule: as `prune_low_magnitude`.
        basis: `"standard"` (default) or `"dct"`, the initial basis.
        depth_groups: int >= 1, bases per layer (one per contiguous group
            of input channels); 1 for a layer whose input channels it does
            not divide (an RGB stem), or, for a `TransformConv2D`, whose
            own `depth_groups` it does not divide.
        layers: which layers: None (every `Conv2D` with `groups=1` and
            every `TransformConv2D`, with a kernel larger than 1x1), names,
            a class or a predicate.

    Returns:
        The wrapper or the new model; train with
        `UpdateTransformPruningStep`, then `strip_model` (which gives
        `FilterBasisConv2D` layers, and `FilterBasisTransformConv2D` for
        the `TransformConv2D`s: their bases in the filter basis).

    Raises:
        ValueError: as `prune_low_magnitude`, or for an invalid `basis` or
            `depth_groups`.

    Example:

    >>> import keras
    >>> import tf_transform_conv as tc
    >>> model = keras.Sequential([keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, name="c")])
    >>> pruned = tc.prune_interspace(model, lambda step: (True, 0.9), basis="dct")
    >>> [type(l).__name__ for l in pruned.layers]
    ['InterspacePruning']
    """
    check_schedule(schedule)
    check_choice(basis, "basis", BASES)
    check_positive_int(depth_groups, "depth_groups")
    if _to_prune(to_prune, "prune_interspace") == "layer":
        return InterspacePruning(to_prune, schedule, basis=basis, depth_groups=depth_groups)

    def make(inner):
        if isinstance(inner, TransformConv2D):
            fits = inner.depth_groups % depth_groups == 0
        else:
            fits = inner.kernel.shape[2] % depth_groups == 0
        groups = depth_groups if fits else 1
        return InterspacePruning(inner, schedule, basis=basis, depth_groups=groups)

    return _wrap_model(
        to_prune, "prune_interspace", layers, ip_skip_reason, make,
        "the keras.layers.Conv2D layers with groups=1 and the TransformConv2D layers, "
        "with a kernel larger than 1x1",
    )
