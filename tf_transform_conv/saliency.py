"""Every filter score in one place: which filters (or channels) matter.

- `filter_saliency(kernel, criterion)`: per filter of one kernel, the L2
  norm (`"magnitude"`, `"reconstruction"`), the L1 norm (`"l1"`) or given
  first-order scores (`"taylor"`): what pruning and conversion rank bases by.
- `gradient_saliency(model, data, kernels)`: first-order (Taylor) scores of
  kernels' output channels from gradients of the compiled loss, per filter
  (`|sum(w * dL/dw)|`) or per weight (`sum |w * dL/dw|`).
- `filter_importance(model, data)`: the knapsack pruning importance of every
  `Conv2D` and `Dense` filter, `sum |w * dL/dw|`.
- `group_norms`, `group_importance`, `dafp_importance`: scores of the coupled
  channel groups of structured removal (`graph.groups`): summed L1 norms,
  summed filter importances, and the dependency-aware importance of DAFP.
"""

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._data import batches
from tf_transform_conv.graph.groups import analyze_groups
from tf_transform_conv.graph.groups import dense_weights
from tf_transform_conv.graph.rewrite import select_layers
from tf_transform_conv.ops.assignment import CRITERIA
from tf_transform_conv.ops.assignment import check_scores

__all__ = [
    "dafp_importance",
    "filter_importance",
    "filter_saliency",
    "gradient_saliency",
    "group_importance",
    "group_norms",
]


def filter_saliency(kernel, criterion, scores=None, subtract_mean=False, kept=None):
    """Each filter's saliency (higher stays) for a global ranking.

    The L2 norm for `"magnitude"` (the paper's saliency) and for
    `"reconstruction"` (which has no per-filter score of its own), the L1
    norm for `"l1"`, and `scores` for `"taylor"`.

    Args:
        kernel: `(kh, kw, c_in, F)` array.
        criterion: one of `CRITERIA`.
        scores: `(F,)` saliencies, for `"taylor"`.
        subtract_mean: subtract the mean over the `kept` filters (the
            paper's v1 for ResNet-50, which keeps layers' rates alike).
        kept: indices of the filters still kept (default: all).

    Returns:
        A float64 array `(F,)`.
    """
    kernel = np.asarray(kernel, np.float64)
    if criterion not in CRITERIA:
        raise ValueError(
            f"Invalid value for argument `criterion`. Expected one of {list(CRITERIA)}. "
            f"Received criterion={criterion!r}."
        )
    if criterion == "taylor":
        values = check_scores(scores, criterion, kernel.shape[-1])
    elif criterion == "l1":
        values = np.abs(kernel).sum(axis=(0, 1, 2))
    else:
        values = np.sqrt((kernel**2).sum(axis=(0, 1, 2)))
    if subtract_mean:
        values = values - values[slice(None) if kept is None else kept].mean()
    return values


def gradient_saliency(model, data, kernels, num_batches=4, batch_size=32,
                      per_weight=False, verb="gradient_saliency"):
    """First-order saliencies of the output channels (last axis) of `kernels`, batch-averaged.

    The gradient of the model's compiled loss with respect to each kernel,
    in inference mode, times the kernel, reduced over every axis but the
    last: `|sum(w * dL/dw)|` per channel (Molchanov et al., "Importance
    Estimation for Neural Network Pruning", CVPR 2019: the Taylor saliency
    `pruning.taylor_scores` ranks filters by), or with `per_weight`
    `sum |w * dL/dw|` (the knapsack pruning importance,
    `filter_importance`), averaged over `num_batches` batches of labelled
    data. TensorFlow backend; the model must be compiled.

    Args:
        model: a compiled, built model.
        data: labelled data, as `(x, y)` arrays, a dataset or `(x, y)` batches.
        kernels: the variables to score (their last axis is the output channel).
        num_batches: int >= 1. Defaults to 4.
        batch_size: int, for array data. Defaults to 32.
        per_weight: take the absolute value per weight instead of per channel.
        verb: the caller's name, for the error when `data` yields no batch.

    Returns:
        A list of float64 arrays `(kernel.shape[-1],)`, one per kernel.

    Raises:
        ValueError: for data without labels or yielding no batch.
    """
    import tensorflow as tf

    totals = [np.zeros(kernel.shape[-1]) for kernel in kernels]
    seen = 0
    for x, y in batches(data, num_batches, batch_size, labelled=True):
        with tf.GradientTape() as tape:
            prediction = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=prediction, training=False)
        for total, kernel, grad in zip(totals, kernels, tape.gradient(loss, kernels)):
            product = np.asarray(kernel, "float64") * np.asarray(grad, "float64")
            axes = tuple(range(product.ndim - 1))
            total += np.abs(product).sum(axis=axes) if per_weight else np.abs(
                product.sum(axis=axes))
        seen += 1
    if not seen:
        raise ValueError(f"{verb}: `data` yielded no batch.")
    return [total / seen for total in totals]


def _scored_layer(layer):
    """Whether `layer`'s `kernel` has the output channels on its last axis (Conv2D, Dense)."""
    return (
        isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
        and not isinstance(layer, (keras.layers.DepthwiseConv2D,
                                   keras.layers.SeparableConv2D))
        and getattr(layer, "kernel", None) is not None
    )


def filter_importance(model, data, layers=None, num_batches=8, batch_size=32):
    """The knapsack pruning importance of every output filter: `sum |w * dL/dw|`.

    For each chosen layer, the gradient of the model's compiled loss with
    respect to its kernel (inference mode), times the kernel, in absolute
    value, summed over each output filter's weights, and averaged over
    `num_batches` batches of labelled data (Aflalo et al., "Knapsack Pruning
    with Inner Distillation", 2020: the first-order estimate of the loss
    change when the filter is removed, with the absolute value taken per
    weight). Same machinery as `gradient_saliency` for `pruning.taylor_scores`, which takes the
    absolute value of each filter's sum instead. TensorFlow backend.

    Args:
        model: a compiled, built Keras model.
        data: labelled data: `(x, y)` arrays (split into `batch_size`
            batches), a `tf.data.Dataset` or an iterable of `(x, y)` batches.
        layers: which layers to score: None (default: every `Conv2D` and
            `Dense` layer; depthwise and separable convolutions, whose
            kernel's last axis is not the output channel, are left out), a
            name or list of names, a layer class or a predicate, among
            those.
        num_batches: int >= 1. Defaults to 8.
        batch_size: int >= 1, for array data. Defaults to 32.

    Returns:
        A dict from layer names to float64 arrays `(filters,)`.

    Raises:
        ValueError: on another backend than TensorFlow, for an uncompiled
            model, data without labels or yielding no batch, or a name in
            `layers` that is no scored layer of the model.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((6, 6, 2)),
    ...     keras.layers.Conv2D(4, 3, name="conv"), keras.layers.Flatten(),
    ...     keras.layers.Dense(3, name="head")])
    >>> model.compile(loss="sparse_categorical_crossentropy")
    >>> x = np.ones((8, 6, 6, 2), "float32"); y = np.zeros(8, "int32")
    >>> filter_importance(model, (x, y), num_batches=1)["conv"].shape
    (4,)
    """
    verb = "filter_importance"
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"{verb}() takes gradients with TensorFlow; the backend is "
            f"{keras.backend.backend()}."
        )
    if getattr(model, "compiled", False) is False and getattr(model, "loss", None) is None:
        raise ValueError(
            f"{verb}() differentiates the model's compiled loss: compile the model "
            "first (`model.compile(loss=...)`)."
        )
    num_batches = check_positive_int(num_batches, "num_batches")
    batch_size = check_positive_int(batch_size, "batch_size")
    chosen = select_layers(
        model, layers,
        lambda l: "" if _scored_layer(l) else "no kernel with its outputs on the last axis")
    scored = [layer for layer in _compat.layers_of(model)
              if layer.name in chosen and _scored_layer(layer)]
    totals = gradient_saliency(
        model, data, [layer.kernel for layer in scored], num_batches, batch_size,
        per_weight=True, verb=verb,
    )
    return {layer.name: total for layer, total in zip(scored, totals)}


def group_norms(analysis, name):
    """The L1 norm of each channel of group `name` (`graph.groups`), summed over its producers.

    What `structured.remove_filters` keeps when it is given a count.

    Args:
        analysis: a `graph.groups.GroupAnalysis`.
        name: a group's name.

    Returns:
        A float64 array `(channels,)`, indexed as the group.
    """
    scores = np.zeros(analysis.group(name).channels)
    for path in analysis.group(name).producers:
        call = analysis.call_of(path)
        kernel = dense_weights(call.layer)[0]
        norms = np.abs(kernel.reshape(-1, kernel.shape[-1])).sum(axis=0)
        _, places = analysis.positions(call.outputs[0])
        np.add.at(scores, places, norms)
    return scores


def group_importance(model, groups, importance, verb="group_importance()"):
    """Per group, each channel's importance summed over the group's producers.

    A producer narrower than its group (a stem writing into a padded
    residual stream) adds to the channels it writes.

    Args:
        model: a built Sequential or Functional model.
        groups: its `graph.groups.ChannelGroup`s to score.
        importance: dict, layer name -> per-filter scores
            (`filter_importance`).
        verb: the caller's name, for the error on a model without a graph.

    Returns:
        dict, group name -> float64 array `(channels,)`.
    """
    analysis = analyze_groups(model, verb)
    out = {}
    for group in groups:
        total = np.zeros(int(group.channels))
        for path in group.producers:
            call = analysis.call_of(path)
            scores = importance.get(call.layer.name)
            if scores is None:
                continue
            _, places = analysis.positions(call.outputs[0])
            inside = places >= 0
            np.add.at(total, places[inside], np.asarray(scores)[inside])
        out[group.name] = total
    return out


def dafp_importance(model):
    """The dependency-aware importance of every channel of every prunable group (DAFP).

    Zhao et al., "Dependency Aware Filter Pruning" (2020): a channel matters
    when both the batch norm that scales it and the next convolution that
    reads it give it weight,

        I_i = |gamma_i| * mean_{o, kh, kw} |W_next[kh, kw, i, o]|.

    Coupled channels (`graph.groups`: every convolution writing into one
    residual stream, a depthwise convolution after its producer) have one
    importance per channel of the group:

        I_i = (sum over the group's batch norms of |gamma_i|)
              * (sum over the group's consumers of mean_{o, kh, kw} |W[kh, kw, i, o]|),

    the paper's formula for a group of one convolution, one batch norm and
    one next convolution. A `Dense` consumer (after global pooling) counts
    `mean_o |W[i, o]|`, a depthwise consumer `mean_{kh, kw} |W[kh, kw, i, 0]|`,
    a `TransformConv2D` consumer its materialised kernel. A group without a
    batch norm uses `|gamma_i| = 1`.

    Args:
        model: a built Sequential or Functional `keras.Model`.

    Returns:
        dict mapping each prunable group's name (`ChannelGroup.name`) to a
        float64 array of its channels' importances, indexed as
        `remove_filters` indexes the group.

    Raises:
        ValueError: if `model` is not a built Sequential or Functional model.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((6, 6, 2))
    >>> x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.Conv2D(3, 3, name="next")(x)
    >>> model = keras.Model(inputs, x)
    >>> importance = dafp_importance(model)
    >>> gamma = model.get_layer("bn").gamma.numpy()
    >>> kernel = model.get_layer("next").kernel.numpy()
    >>> bool(np.allclose(importance["conv"],
    ...                  np.abs(gamma) * np.abs(kernel).mean(axis=(0, 1, 3))))
    True
    """
    return group_dafp_importance(analyze_groups(model, "dafp_importance()"))


def group_dafp_importance(analysis):
    """`dafp_importance` of an already analysed model (`graph.groups.GroupAnalysis`)."""
    out = {}
    for group in analysis.groups:
        if not group.prunable:
            continue
        gamma = np.zeros(group.channels)
        seen = np.zeros(group.channels, bool)
        for path in group.batch_norms:
            call = analysis.call_of(path)
            layer = call.layer
            values = (np.abs(keras.ops.convert_to_numpy(layer.gamma)) if layer.scale
                      else np.ones(layer.moving_mean.shape[0]))
            _add(analysis, call.inputs[0], group.name, values, gamma, seen)
        gamma[~seen] = 1.0
        weight = np.zeros(group.channels)
        seen = np.zeros(group.channels, bool)
        for path in group.consumers:
            call = analysis.call_of(path)
            kernel = dense_weights(call.layer)[0]
            if call.kind == "depthwise":
                values = np.abs(kernel).mean(axis=(0, 1, 3))
            else:  # (kh, kw, c_in, c_out) or (c_in, c_out)
                values = np.abs(kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])).mean(
                    axis=(0, 2))
            _add(analysis, call.inputs[0], group.name, values, weight, seen)
        weight[~seen] = 1.0
        out[group.name] = gamma * weight
    return out


def _add(analysis, key, name, values, total, seen):
    """Adds the per-channel `values` of tensor `key` to `total`, on group `name`'s channels."""
    names, places = analysis.positions(key)
    mine = np.array([n == name for n in names], bool)
    np.add.at(total, places[mine], values[mine])
    seen[places[mine]] = True
