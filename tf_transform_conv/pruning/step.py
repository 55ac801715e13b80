"""Driving the pruning step: every wrapper of a model advanced to a step, together.

`update_pruning_step(model, step)` is what the step callback runs before each
training batch (and what a custom loop calls): it evaluates each wrapper's
schedule once, lets per-layer wrappers prune themselves, prunes the global
ones together to one ranking (`prune_globally`), then runs every wrapper's
`after_step` and records the step. `taylor_scores` gives the first-order
saliencies that wrappers ranking by `criterion="taylor"` need.
"""

import json

import keras

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_nonnegative_int
from tf_transform_conv.ops.assignment import allocate_globally
from tf_transform_conv.ops.assignment import kept_filters
from tf_transform_conv.pruning.schedules import evaluate_schedule
from tf_transform_conv.pruning.schedules import saved_by_name
from tf_transform_conv.pruning.schedules import serialize_schedule
from tf_transform_conv.pruning.transform_pruning import TransformPruning
from tf_transform_conv.pruning.wrapper import PruningWrapper
from tf_transform_conv.saliency import gradient_saliency

__all__ = [
    "advance",
    "pruning_wrappers",
    "prune_globally",
    "step_decisions",
    "taylor_scores",
    "transform_wrappers",
    "update_pruning_step",
]


def pruning_wrappers(model):
    """Every `PruningWrapper` of `model` (nested models included), in order."""
    return [layer for layer in _compat.layers_of(model) if isinstance(layer, PruningWrapper)]


def transform_wrappers(model):
    """Every `TransformPruning` wrapper of `model`, in order."""
    return [layer for layer in _compat.layers_of(model) if isinstance(layer, TransformPruning)]


def update_pruning_step(model, step, scores=None):
    """Advances every wrapper of `model` to `step` (for custom training loops).

    Per-layer wrappers prune themselves when their schedule says so; the
    global ones (`allocation="global"`) prune together, under the schedule
    of the first of them (they must share one), to one ranking over all of
    them (`prune_globally`).

    Args:
        model: a model holding pruning wrappers (`TransformPruning`,
            `MagnitudePruning`, `InterspacePruning`: any `PruningWrapper`).
        step: int >= 0, the training step (a scalar integer tensor or
            variable, such as `optimizer.iterations`, is read as its value).
        scores: optional dict from wrapper names to per-filter saliencies,
            for wrappers with `criterion="taylor"` (`taylor_scores`).

    Returns:
        The names of the wrappers that pruned at this step.

    Raises:
        ValueError: if `step` is not an integer >= 0 or `scores` not a dict.
    """
    if hasattr(step, "dtype") and hasattr(step, "shape") and tuple(step.shape) == ():
        step = keras.ops.convert_to_numpy(step).item()
    step = check_nonnegative_int(step, "step", expected="an int >= 0 (the training step)")
    if scores is not None and not isinstance(scores, dict):
        raise ValueError(
            "Invalid value for argument `scores`. Expected None or a dict from wrapper "
            f"names to per-filter saliencies (taylor_scores). Received scores={scores!r}."
        )
    return advance(pruning_wrappers(model), step, scores or {})


def step_decisions(wrappers, step):
    """`(should_prune, sparsity)` per wrapper at `step`, each schedule evaluated once.

    A per-layer wrapper decides through its `decision(step)`; the global
    wrappers share the first global wrapper's schedule.
    """
    together = [w for w in wrappers if w.allocation == "global"]
    shared = evaluate_schedule(together[0].schedule, step) if together else None
    return [shared if w.allocation == "global" else w.decision(step) for w in wrappers]


def advance(wrappers, step, scores, decisions=None):
    """Advances `wrappers` to `step`: prunes the due ones, then `after_step` and the step for all.

    Args:
        wrappers: the model's `PruningWrapper`s (`pruning_wrappers`).
        step: int.
        scores: dict, wrapper name -> first-order scores, for `"taylor"` ones.
        decisions: `step_decisions(wrappers, step)`, when already evaluated.

    Returns:
        The names of the wrappers that pruned.
    """
    if decisions is None:
        decisions = step_decisions(wrappers, step)
    pruned = []
    for wrapper, (should_prune, sparsity) in zip(wrappers, decisions):
        wrapper.step_callback_attached = True
        if should_prune and wrapper.allocation == "per_layer":
            wrapper.prune_to(sparsity, step, scores=scores.get(wrapper.name))
            pruned.append(wrapper.name)
    together = [w for w in wrappers if w.allocation == "global"]
    if together:
        should_prune, sparsity = decisions[wrappers.index(together[0])]
        if should_prune:
            _check_one_schedule(together)
            prune_globally(together, sparsity, step, scores)
            pruned += [w.name for w in together]
    for wrapper in wrappers:  # after pruning: a failed step is not skipped
        wrapper.after_step()
        wrapper.pruning_step.assign(step)
    return pruned


def _check_one_schedule(wrappers):
    configs = {id(w.schedule) if saved_by_name(w.schedule)
               else json.dumps(serialize_schedule(w.schedule), sort_keys=True, default=str)
               for w in wrappers}
    if len(configs) > 1:
        raise ValueError(
            "Wrappers with allocation='global' prune together and need one schedule; "
            f"{[w.name for w in wrappers]} have different ones. Pass the same schedule "
            "to every wrapper (prune_model does)."
        )


def prune_globally(wrappers, sparsity, step=None, scores=None):
    """Prunes `wrappers` together to `sparsity` over all their filters.

    Keeps `kept_filters(total, sparsity)` filters over all the wrappers,
    split by one ranking of their saliencies (`TransformPruning.saliency`)
    with each wrapper keeping at least its `min_bases` and never more than
    it keeps now (`ops.assignment.allocate_globally`); then each wrapper refits
    to its count with its own criterion.

    Returns:
        The kept count per wrapper.
    """
    scores = scores or {}
    total = sum(w.layer.filters for w in wrappers)
    target = kept_filters(total, sparsity)
    saliencies = [w.saliency(scores.get(w.name))[w.kept] for w in wrappers]
    counts = allocate_globally(saliencies, target, [w.min_bases for w in wrappers])
    for wrapper, count in zip(wrappers, counts):
        wrapper.prune_to(step=step, scores=scores.get(wrapper.name), count=count)
    return counts


def taylor_scores(model, data, num_batches=4, batch_size=32):
    """The first-order saliency of every wrapped filter: `|sum(w * dL/dw)|`, averaged over batches.

    For each `TransformPruning` wrapper, the gradient of the model's
    compiled loss (`model.compute_loss`) with respect to the wrapped kernel,
    times the kernel, summed over each filter's entries (Molchanov et al.,
    "Importance Estimation for Neural Network Pruning", CVPR 2019), on
    `num_batches` batches of labelled data, the model in inference mode. A
    kept filter's gradient includes what reaches it through the filters
    rebuilt from it. TensorFlow backend.

    Args:
        model: a compiled model holding wrappers.
        data: `(x, y)` arrays (split into `batch_size` batches), a
            `tf.data.Dataset` or an iterable of `(x, y)` batches.
        num_batches: int >= 1. Defaults to 4.
        batch_size: int, for array data.

    Returns:
        A dict from wrapper names to float arrays `(filters,)`.

    Raises:
        ValueError: on another backend, for an uncompiled model, or data
            without labels.
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "taylor_scores() takes gradients with TensorFlow; on the "
            f"{keras.backend.backend()} backend use criterion='magnitude'."
        )
    if getattr(model, "compiled", False) is False and getattr(model, "loss", None) is None:
        raise ValueError(
            "taylor_scores() differentiates the model's compiled loss: compile the "
            "model first."
        )
    wrappers = transform_wrappers(model)
    totals = gradient_saliency(
        model, data, [w.layer.kernel for w in wrappers], num_batches, batch_size,
        verb="taylor_scores",
    )
    return {w.name: total for w, total in zip(wrappers, totals)}
