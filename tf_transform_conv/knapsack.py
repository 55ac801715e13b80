"""Knapsack allocation: which filters to keep under a budget, and the solvers.

Aflalo et al., "Knapsack Pruning with Inner Distillation" (2020), choose the
filters a network keeps as a 0/1 knapsack: each filter (or each coupled set
of channels, such as the channels of one residual stream) is an item whose
*value* is its importance, the first-order Taylor estimate
`sum |w * dL/dw|` over its weights accumulated over batches of data
(`filter_importance`), and whose *weight* is what keeping it costs
(parameters, multiply-adds or measured latency, `channel_costs`); the
capacity is the budget.

The solvers work on plain arrays and know nothing of Keras:

- `solve_knapsack(values, weights, capacity, method="exact")`: the 0/1
  knapsack, exactly by dynamic programming over integer weights (real
  weights are scaled and rounded *up*, so the chosen set never exceeds the
  capacity in the original units), or greedily by value density with the
  best-single-item fix, which guarantees at least half the optimum.
- `solve_multiple_choice(values, costs, capacity, method="exact")`: one
  option per group (as `tf_transform_conv.budget` uses to choose each
  layer's bases and lowering), by dynamic programming over the discretised
  cost, or greedily along each group's upper convex hull.

`knapsack_removal(model, data, budget, cost=...)` puts them together on a
Keras model: it finds the coupled channel groups
(`tf_transform_conv.structured.channel_groups`), scores their channels,
solves the knapsack and removes what is not chosen
(`structured.remove_filters`). `LatencyTable` measures single layers in the
LiteRT interpreter (batch 1, one thread by default) and caches the results
in a JSON file; `tflite_latency` times a whole `.tflite` file the same way.
"""

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import is_number
from tf_transform_conv.rewrite import select_layers

__all__ = [
    "COSTS",
    "KnapsackRemoval",
    "LatencyTable",
    "channel_costs",
    "filter_importance",
    "knapsack_removal",
    "solve_knapsack",
    "solve_multiple_choice",
    "tflite_latency",
]

METHODS = ("exact", "greedy")
COSTS = ("params", "macs", "latency")

# The exact solvers' table: at most this many cells (items x capacity units).
_MAX_CELLS = 40_000_000
_MAX_UNITS = 1_000_000


# ----------------------------------------------------------------------------
# Solvers


def _check_method(method):
    check_choice(method, "method", METHODS)


def _check_capacity(capacity):
    if not is_number(capacity) or not math.isfinite(capacity) or capacity < 0:
        raise ValueError(
            "Invalid value for argument `capacity`. Expected a finite number >= 0. "
            f"Received capacity={capacity!r}."
        )
    return float(capacity)


def _as_vector(values, name, nonnegative=False):
    try:
        array = np.asarray(values, dtype="float64")
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a 1-D sequence of finite "
            f"numbers. Received {name}={values!r}."
        )
    if nonnegative and np.any(array < 0):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected numbers >= 0. Received "
            f"{name} with minimum {array.min()}."
        )
    return array


def _units(weights, capacity, rows, resolution):
    """`(integer weights, integer capacity)` for the dynamic programme.

    Integral weights and capacity are kept as they are when the table fits;
    otherwise everything is multiplied by `units / capacity` and the
    weights are rounded up, the capacity down: a set within the scaled
    capacity is then within the original one.
    """
    integral = np.all(weights == np.round(weights)) and capacity == round(capacity)
    limit = resolution or max(1000, min(_MAX_UNITS, _MAX_CELLS // max(rows, 1)))
    if integral and capacity <= limit:
        return weights.astype("int64"), int(capacity)
    factor = limit / capacity
    # Rounded up (with a margin for the product's own rounding): an over-estimate.
    scaled = np.ceil(weights * factor * (1 + 1e-12))
    return scaled.astype("int64"), int(math.floor(capacity * factor))


def solve_knapsack(values, weights, capacity, method="exact", resolution=None):
    """Solves the 0/1 knapsack: the items of most total value within a capacity.

    Maximises `sum(values[i] for i in chosen)` subject to
    `sum(weights[i] for i in chosen) <= capacity`. Items with a value of 0
    or less are never chosen; items of weight 0 and positive value always
    are.

    `method="exact"` solves by dynamic programming over integer weights. When
    the weights and capacity are integers and the capacity is at most the
    table's width (`resolution`, by default as many units as keep the table
    under 40 million cells, at most a million), the result is optimal.
    Otherwise weights are real-valued (or too large): the capacity is mapped
    to `resolution` units, each weight is scaled by the same factor and
    rounded *up*, the capacity rounded *down*. The chosen set then never
    exceeds the capacity in the original units, and it is optimal for the
    rounded weights; it can miss the true optimum only by what rounding
    costs, at most one unit per chosen item (so `resolution` units are
    worth raising when items are many and light).

    `method="greedy"` sorts items by value density `value / weight` and
    takes them in that order while they fit (items that do not fit are
    skipped and later, lighter ones still tried); it then compares that
    set with the single most valuable item that fits and returns the better.
    Its value is at least half the optimum (the greedy prefix up to the
    first item that does not fit, plus that item, is worth at least the
    fractional optimum, which bounds the 0/1 optimum; the prefix and the
    item are each no better than what is returned). It runs in
    `O(n log n)`.

    Args:
        values: 1-D sequence of finite floats, each item's value.
        weights: 1-D sequence of finite floats >= 0, each item's weight.
        capacity: float >= 0, the budget, in the weights' units.
        method: `"exact"` (default) or `"greedy"`.
        resolution: optional int >= 1, the exact solver's number of
            capacity units when it scales real weights (see above).

    Returns:
        A sorted int64 numpy array of the chosen items' indices.

    Raises:
        ValueError: for sequences that are not 1-D and finite, of different
            lengths, negative weights, a negative or infinite capacity, an
            unknown `method` or a `resolution` that is not a positive int.

    Example:

    >>> solve_knapsack([6, 10, 12], [1, 2, 3], capacity=5)
    array([1, 2])
    >>> solve_knapsack([6, 10, 12], [1, 2, 3], capacity=5, method="greedy")
    array([0, 1])
    """
    values = _as_vector(values, "values")
    weights = _as_vector(weights, "weights", nonnegative=True)
    if len(values) != len(weights):
        raise ValueError(
            "`values` and `weights` must have the same length. Received "
            f"{len(values)} values and {len(weights)} weights."
        )
    capacity = _check_capacity(capacity)
    _check_method(method)
    if resolution is not None:
        resolution = check_positive_int(resolution, "resolution")
    useful = np.flatnonzero((values > 0) & (weights <= capacity))
    free = useful[weights[useful] == 0]
    paid = useful[weights[useful] > 0]
    if method == "greedy":
        chosen = _greedy(values[paid], weights[paid], capacity)
    else:
        chosen = _exact(values[paid], weights[paid], capacity, resolution)
    return np.sort(np.concatenate([free, paid[chosen]])).astype("int64")


def _exact(values, weights, capacity, resolution):
    if len(values) == 0:
        return np.zeros(0, "int64")
    w, cap = _units(weights, capacity, len(values), resolution)
    best = np.zeros(cap + 1)
    take = np.zeros((len(values), cap + 1), dtype=bool)
    for i, (v, wi) in enumerate(zip(values, w)):
        if wi > cap:
            continue
        candidate = best[:cap + 1 - wi] + v
        better = candidate > best[wi:]
        take[i, wi:] = better
        best[wi:] = np.where(better, candidate, best[wi:])
    chosen, c = [], cap
    for i in range(len(values) - 1, -1, -1):
        if take[i, c]:
            chosen.append(i)
            c -= w[i]
    return np.asarray(chosen[::-1], "int64")


def _greedy(values, weights, capacity):
    if len(values) == 0:
        return np.zeros(0, "int64")
    order = np.argsort(-values / weights, kind="stable")
    chosen, used = [], 0.0
    for i in order:
        if used + weights[i] <= capacity:
            chosen.append(i)
            used += weights[i]
    single = int(np.argmax(values))  # every item here fits on its own
    if values[single] > values[chosen].sum():
        chosen = [single]
    return np.asarray(chosen, "int64")


def solve_multiple_choice(values, costs, capacity, method="exact", resolution=None):
    """Solves the multiple-choice knapsack: one option per group, most value within a capacity.

    Group `g` offers options `j` of value `values[g][j]` and cost
    `costs[g][j]`; exactly one option is taken per group, maximising the
    total value with the total cost at most `capacity`.

    `method="exact"`: dynamic programming over the cost discretised as in
    `solve_knapsack` (costs rounded up, capacity down, so the choice never
    exceeds the capacity in the original units; exact for integer costs
    that fit the table). `method="greedy"`: starts from each group's cheapest
    option and repeatedly takes the upgrade of best value gained per cost
    added along the groups' upper convex hulls (the linear relaxation's
    order) while it fits. Costs may be negative (a measured latency
    relative to a reference); they are shifted per group by the group's
    cheapest option.

    Args:
        values: sequence of 1-D sequences of finite floats, one per group.
        costs: sequence of 1-D sequences of finite floats, same shapes.
        capacity: float, the budget in the costs' units.
        method: `"exact"` (default) or `"greedy"`.
        resolution: optional int, the exact solver's capacity units.

    Returns:
        An int64 numpy array: the chosen option of each group.

    Raises:
        ValueError: for mismatched or empty groups, non-finite numbers, an
            unknown `method`, or a capacity below the sum of each group's
            cheapest option (nothing fits).

    Example:

    >>> solve_multiple_choice([[0, 5, 9], [0, 4, 7]], [[1, 2, 4], [1, 3, 5]], capacity=7)
    array([2, 1])
    """
    _check_method(method)
    if not isinstance(values, (list, tuple)) or not isinstance(costs, (list, tuple)) or (
        len(values) != len(costs)
    ):
        raise ValueError(
            "`values` and `costs` must be sequences with one entry per group, of the "
            f"same length. Received {type(values).__name__} and {type(costs).__name__}."
        )
    groups = []
    for g, (v, c) in enumerate(zip(values, costs)):
        v = _as_vector(v, f"values[{g}]")
        c = _as_vector(c, f"costs[{g}]")
        if len(v) != len(c) or len(v) == 0:
            raise ValueError(
                f"Group {g} must offer at least one option, with as many values as "
                f"costs. Received {len(v)} values and {len(c)} costs."
            )
        groups.append((v, c))
    if not is_number(capacity) or not math.isfinite(capacity):
        raise ValueError(
            f"Invalid value for argument `capacity`. Expected a finite number. "
            f"Received capacity={capacity!r}."
        )
    floor = sum(c.min() for _, c in groups)
    if capacity < floor - 1e-12 * max(1.0, abs(floor)):
        raise ValueError(
            f"The capacity {capacity} is below the cheapest choice's cost {floor}: "
            "no choice fits. Raise the budget or offer cheaper options."
        )
    shifted = [(v, c - c.min()) for v, c in groups]
    room = max(0.0, float(capacity - floor))
    if resolution is not None:
        resolution = check_positive_int(resolution, "resolution")
    if method == "greedy":
        return _greedy_multiple(shifted, room)
    return _exact_multiple(shifted, room, resolution)


def _exact_multiple(groups, room, resolution):
    if room == 0:
        return np.asarray([int(np.argmax(np.where(c == 0, v, -np.inf))) for v, c in groups])
    every = np.concatenate([c for _, c in groups])
    w_all, cap = _units(every, room, len(groups), resolution)
    splits = np.cumsum([len(c) for _, c in groups])[:-1]
    weights = np.split(w_all, splits)
    best = np.zeros(cap + 1)
    picks = np.zeros((len(groups), cap + 1), dtype="int32")
    for g, ((v, _), w) in enumerate(zip(groups, weights)):
        new = np.full(cap + 1, -np.inf)
        for j, (vj, wj) in enumerate(zip(v, w)):
            if wj > cap:
                continue
            candidate = np.full(cap + 1, -np.inf)
            candidate[wj:] = best[:cap + 1 - wj] + vj
            better = candidate > new
            new = np.where(better, candidate, new)
            picks[g] = np.where(better, j, picks[g])
        best = new
    choice = np.zeros(len(groups), "int64")
    c = int(np.argmax(best))
    for g in range(len(groups) - 1, -1, -1):
        choice[g] = picks[g, c]
        c -= weights[g][choice[g]]
    return choice


def _hull(v, c):
    """Indices of the upper convex hull of (cost, value), by increasing cost."""
    order = np.lexsort((-v, c))
    hull = []
    for j in order:
        if hull and c[j] == c[hull[-1]]:
            continue  # same cost, lower value
        if hull and v[j] <= v[hull[-1]]:
            continue  # dominated
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or below the segment a -> j
            if (v[b] - v[a]) * (c[j] - c[a]) <= (v[j] - v[a]) * (c[b] - c[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _greedy_multiple(groups, room):
    hulls = [_hull(v, c) for v, c in groups]
    position = [0] * len(groups)
    choice = np.asarray([h[0] for h in hulls], "int64")
    used = 0.0
    while True:
        best, best_g = None, None
        for g, (v, c) in enumerate(groups):
            p = position[g]
            if p + 1 >= len(hulls[g]):
                continue
            a, b = hulls[g][p], hulls[g][p + 1]
            if used + c[b] - c[a] > room:
                continue
            gain = (v[b] - v[a]) / max(c[b] - c[a], 1e-300)
            if best is None or gain > best:
                best, best_g = gain, g
        if best_g is None:
            return choice
        g = best_g
        a, b = hulls[g][position[g]], hulls[g][position[g] + 1]
        used += groups[g][1][b] - groups[g][1][a]
        position[g] += 1
        choice[g] = b


# ----------------------------------------------------------------------------
# Importance


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
    weight). Same machinery as `pruning.taylor_scores`, which takes the
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
    from tf_transform_conv.pruning import kernel_taylor_scores

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
    chosen = select_layers(model, layers, _scored_layer)
    scored = [layer for layer in _compat.layers_of(model)
              if layer.name in chosen and _scored_layer(layer)]
    totals = kernel_taylor_scores(
        model, data, [layer.kernel for layer in scored], num_batches, batch_size,
        per_weight=True, verb=verb,
    )
    return {layer.name: total for layer, total in zip(scored, totals)}


# ----------------------------------------------------------------------------
# Costs of channel groups


def _layer_totals(model, cost, latency_table=None):
    """`{layer name: cost}` of every layer of `model` (summed over its calls)."""
    from tf_transform_conv.cost import model_cost

    totals = {}
    if cost == "latency":
        if latency_table is None:
            raise ValueError(
                "cost='latency' needs measured latencies: pass latency_table=LatencyTable(...) "
                "(a cache file path keeps the measurements between runs)."
            )
        for layer, input_shape in _layer_inputs(model):
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
                totals[layer.name] = totals.get(layer.name, 0.0) + latency_table.layer_latency(
                    layer, input_shape)
        return totals
    for entry in model_cost(model).layers:  # named as channel_groups names them
        totals[entry.name] = totals.get(entry.name, 0) + (
            entry.params if cost == "params" else entry.macs)
    return totals


def _layer_inputs(model):
    """`(layer, input shape without batch)` for every single-input layer call of `model`."""
    out = []
    for layer in _compat.layers_of(model):
        for node in getattr(layer, "_inbound_nodes", []):
            tensors = node.input_tensors
            if len(tensors) == 1 and layer not in out:
                out.append((layer, tuple(tensors[0].shape[1:])))
    return out


class GroupCosts:
    """What keeping each channel of each group costs, and the exact total.

    Each layer touching prunable groups (as a producer or a consumer)
    costs `C_L * prod_g (k_g / W_g)` over the distinct groups `g` it
    touches, with `k_g` of the `W_g` channels kept: a convolution between
    two groups scales with both widths, a batch norm or a depthwise
    convolution inside one group with its width. `C_L` is the layer's full
    cost (`cost.model_cost` parameters or multiply-adds, or its measured
    latency). The knapsack's additive weight of a channel of group `g` is
    `sum_L C_L / (n_L * W_g)` over the `n_L`-group layers touching it: the
    layer's cost shared equally among its groups, then among their
    channels. At full width that adds up to the exact total, and for any
    widths it is an upper bound of it (a product of fractions in [0, 1] is
    at most their mean), so a set within the budget in these weights is
    within it in fact; `total(kept)` gives the exact figure.

    Attributes:
        names: the group names, in order.
        widths: int array, each group's channels.
        per_channel: float array, the additive weight of one channel of
            each group.
        fixed: float, the cost of the layers no prunable group touches.
    """

    def __init__(self, groups, totals, fixed):
        self.names = [g.name for g in groups]
        self.widths = np.asarray([len(g.channels) if hasattr(g.channels, "__len__")
                                  else int(g.channels) for g in groups], "int64")
        touching = {}
        for index, group in enumerate(groups):
            members = (set(group.producers) | set(group.consumers)
                       | set(getattr(group, "batch_norms", ())))
            for name in members:
                touching.setdefault(name, set()).add(index)
        self._terms = [(totals.get(name, 0.0), sorted(indices))
                       for name, indices in touching.items()]
        covered = set(touching)
        self.fixed = float(fixed + sum(c for n, c in totals.items() if n not in covered))
        self.per_channel = np.zeros(len(groups))
        for c, indices in self._terms:
            for i in indices:
                self.per_channel[i] += c / (len(indices) * self.widths[i])

    def total(self, kept):
        """The exact cost with `kept[i]` channels of group `i` kept."""
        fractions = np.asarray(kept, "float64") / self.widths
        return self.fixed + sum(c * np.prod(fractions[i]) for c, i in self._terms)

    def dense(self):
        """The cost with every channel kept."""
        return self.total(self.widths)


def channel_costs(model, groups=None, cost="params", latency_table=None, fixed=None):
    """The per-channel knapsack weights of a model's prunable channel groups.

    Args:
        model: a built Sequential or Functional model.
        groups: its `structured.ChannelGroup`s (computed when None); only
            the prunable ones are items, the others count as fixed cost.
        cost: `"params"`, `"multiply-adds"` (`"macs"`, both from
            `cost.model_cost`), or `"latency"` (the layers' latencies in
            milliseconds from `latency_table`; the rest of the model's
            measured latency, when `fixed` gives it, is the fixed part).
        latency_table: a `LatencyTable`, for `cost="latency"`.
        fixed: optional extra fixed cost (for latency: the model's measured
            latency less the sum of its layers').

    Returns:
        A `GroupCosts` over the prunable groups.

    Raises:
        ValueError: for an unknown `cost`, or `"latency"` without a table.
    """
    check_choice(cost, "cost", COSTS)
    if groups is None:
        from tf_transform_conv import structured

        groups = structured.channel_groups(model)
    prunable = [g for g in groups if g.prunable]
    totals = _layer_totals(model, cost, latency_table)
    return GroupCosts(prunable, totals, fixed or 0.0)


# ----------------------------------------------------------------------------
# Removal


@dataclasses.dataclass
class KnapsackRemoval:
    """What `knapsack_removal` chose.

    Attributes:
        keep: dict, group name -> sorted kept channel indices (as
            `structured.remove_filters` takes).
        cost: str, the cost kind.
        dense_cost: float, the model's cost before removal (the knapsack's
            model of it: exact for parameters and multiply-adds).
        target: float, the budget in the cost's units.
        predicted_cost: float, the cost of the kept channels
            (`GroupCosts.total`), at most `target`.
        value: float, the kept channels' total importance.
        importance: dict, group name -> importance per channel.
    """

    keep: dict
    cost: str
    dense_cost: float
    target: float
    predicted_cost: float
    value: float
    importance: dict

    def to_dict(self):
        return {
            "keep": {k: [int(i) for i in v] for k, v in self.keep.items()},
            "cost": self.cost, "dense_cost": self.dense_cost, "target": self.target,
            "predicted_cost": self.predicted_cost, "value": self.value,
        }


def group_importance(model, groups, importance):
    """Per group, each channel's importance summed over the group's producers.

    A producer narrower than its group (a stem writing into a padded
    residual stream) adds to the channels it writes.
    """
    from tf_transform_conv import structured

    analysis = structured._analysis(model, "knapsack_removal()")
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


def knapsack_removal(model, data, budget=None, cost="params", target=None, method="exact",
                     num_batches=8, batch_size=32, min_channels=1, latency_table=None,
                     fixed_latency=None, importance=None, normalize=None):
    """Removes the filters a knapsack finds least worth their cost.

    Every prunable channel group of the model
    (`structured.channel_groups`: the channels one convolution writes, or
    every channel of a residual stream written by several, as one group) is
    a set of items, one per channel: its value is the importance of the
    channel summed over the group's producers (`filter_importance`,
    `sum |w * dL/dw|`), its weight its cost (`channel_costs`: parameters,
    multiply-adds, or measured LiteRT latency, each layer's cost shared
    among the groups it connects). The 0/1 knapsack (`solve_knapsack`)
    keeps the channels of most total importance whose cost fits the budget,
    each group keeping at least `min_channels` (its most important ones);
    the others are removed with `structured.remove_filters`. The knapsack's
    weights over-estimate the cost of a thinned model (see `GroupCosts`), so
    its capacity is then raised by bisection to the largest at which the
    exact cost of the kept channels still fits.

    With `cost="latency"` each convolution's and dense layer's latency is
    measured alone (`latency_table`), and the model's latency is modelled
    as the sum of the layers' latencies, each scaled by the fractions of
    its input and output channels kept, plus `fixed_latency` (the rest):
    an approximation, since interpreter latency is not linear in the
    width; measure the result (`tflite_latency`).

    Args:
        model: a built Sequential or Functional model, compiled (its loss
            gives the gradients), TensorFlow backend.
        data: labelled data for the importance: `(x, y)` arrays, a dataset
            or `(x, y)` batches.
        budget: float in (0, 1], the cost kept relative to the model's; or
            give `target`.
        cost: `"params"` (default), `"macs"` or `"latency"`.
        target: the budget in the cost's own units (parameters,
            multiply-adds, milliseconds) instead of `budget`.
        method: `"exact"` (default) or `"greedy"`, as `solve_knapsack`.
        num_batches, batch_size: for the importance.
        min_channels: int >= 1, the fewest channels a group keeps.
        latency_table: a `LatencyTable`, for `cost="latency"`.
        fixed_latency: for `cost="latency"`, the latency not in the measured
            layers (ms; default 0).
        importance: optional precomputed `filter_importance(model, data)`.
        normalize: None (default: the paper's raw importance) or `"l2"`:
            each group's importances divided by their L2 norm over the
            group (the layer-wise normalisation of Molchanov et al.,
            "Pruning Convolutional Neural Networks for Resource Efficient
            Inference", 2017), which makes groups of different gradient
            scales comparable; raw first-order importances are additive
            estimates and, at budgets far below the dense cost, can leave a
            group a single channel.

    Returns:
        `(new_model, removal)`: the smaller model (plain layers) and a
        `KnapsackRemoval`.

    Raises:
        ValueError: for both or neither of `budget` / `target`, a budget
            out of range, a target below what the fixed layers and the
            `min_channels` of each group cost, or as `filter_importance` and
            `channel_costs`.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(16, 3, name="c1")(inputs)
    >>> x = keras.layers.Conv2D(16, 3, name="c2")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    >>> model.compile(loss="sparse_categorical_crossentropy")
    >>> data = (np.random.rand(16, 8, 8, 3).astype("float32"), np.zeros(16, "int32"))
    >>> small, removal = knapsack_removal(model, data, budget=0.5, num_batches=1)
    >>> small.count_params() <= 0.5 * model.count_params()
    True
    """
    from tf_transform_conv import structured

    if (budget is None) == (target is None):
        raise ValueError(
            f"Pass exactly one of `budget` (a fraction of the model's cost) or `target` "
            f"(in the cost's units). Received budget={budget!r}, target={target!r}."
        )
    if budget is not None and not (is_number(budget) and 0 < budget <= 1):
        raise ValueError(
            f"Invalid value for argument `budget`. Expected a fraction in (0, 1]. "
            f"Received budget={budget!r}."
        )
    if target is not None and not (is_number(target) and target > 0):
        raise ValueError(
            f"Invalid value for argument `target`. Expected a number > 0. "
            f"Received target={target!r}."
        )
    _check_method(method)
    min_channels = check_positive_int(min_channels, "min_channels")
    if normalize not in (None, "l2"):
        raise ValueError(
            "Invalid value for argument `normalize`. Expected None or 'l2'. "
            f"Received normalize={normalize!r}.")
    groups = [g for g in structured.channel_groups(model) if g.prunable]
    costs = channel_costs(model, groups, cost, latency_table,
                          fixed_latency if cost == "latency" else None)
    dense = costs.dense()
    target = float(target if target is not None else budget * dense)
    if importance is None:
        importance = filter_importance(model, data, num_batches=num_batches,
                                       batch_size=batch_size)
    scores = group_importance(model, groups, importance)
    if normalize == "l2":
        scores = {name: v / max(float(np.linalg.norm(v)), 1e-30) for name, v in scores.items()}
    exact = None
    if cost != "latency":
        def exact(keep):
            counted = structured.removal_cost(model, keep)
            return float(counted.params if cost == "params" else counted.macs)
    keep, predicted, value = _choose(groups, costs, scores, target, method, min_channels,
                                     exact)
    new_model = structured.remove_filters(model, keep)
    return new_model, KnapsackRemoval(keep, cost, dense, target, predicted, value, scores)


def _choose(groups, costs, scores, target, method, min_channels, exact=None):
    """The kept channels per group: knapsack over the linearised costs, capacity bisected.

    The capacity is bisected against `costs.total`; then, if `exact(keep)`
    (the cost `structured.removal_cost` reports) still exceeds the target,
    bisected further down against it.
    """
    forced, items = [], []  # (group index, channel)
    for index, group in enumerate(groups):
        order = np.argsort(-scores[group.name], kind="stable")
        m = min(min_channels, len(order))
        forced += [(index, c) for c in order[:m]]
        items += [(index, c) for c in order[m:]]
    base = np.zeros(len(groups), "int64")
    for index, _ in forced:
        base[index] += 1
    if costs.total(base) > target:
        raise ValueError(
            f"The budget ({target:.6g}) is below the cost of the layers left whole and "
            f"{min_channels} channel(s) per group ({costs.total(base):.6g}): nothing fits. "
            "Raise the budget or lower `min_channels`."
        )
    values = np.asarray([scores[groups[i].name][c] for i, c in items])
    # Every channel must be worth something to be chosen; ties kept cheap ones first.
    values = np.maximum(values, 1e-12 * max(float(values.max(initial=0.0)), 1e-30))
    weights = np.asarray([costs.per_channel[i] for i, _ in items])
    linear_base = costs.fixed + float((base * costs.per_channel).sum())

    def solve(capacity):
        chosen = solve_knapsack(values, weights, max(0.0, capacity - linear_base), method)
        kept = base.copy()
        for j in chosen:
            kept[items[j][0]] += 1
        return chosen, kept

    def keep_of(chosen):
        keep = {g.name: [] for g in groups}
        for index, c in forced:
            keep[groups[index].name].append(int(c))
        for j in chosen:
            index, c = items[j]
            keep[groups[index].name].append(int(c))
        return {name: sorted(v) for name, v in keep.items()}

    # Above the full linearised cost (plus room for the solver's rounding) every item fits.
    low, high = target, max(target, 1.05 * (linear_base + float(weights.sum())))
    best = solve(low)
    for _ in range(20):
        if high - low <= 1e-4 * target:
            break
        middle = 0.5 * (low + high)
        candidate = solve(middle)
        if costs.total(candidate[1]) <= target:
            low, best = middle, candidate
        else:
            high = middle
    if exact is not None and exact(keep_of(best[0])) > target:
        high, low = low, linear_base
        best = solve(low)
        for _ in range(12):
            middle = 0.5 * (low + high)
            candidate = solve(middle)
            if exact(keep_of(candidate[0])) <= target:
                low, best = middle, candidate
            else:
                high = middle
        if exact(keep_of(best[0])) > target:
            raise ValueError(
                f"No channel choice above the forced minimum fits the budget {target:.6g}; "
                "raise the budget or lower `min_channels`.")
    chosen, kept = best
    predicted = exact(keep_of(chosen)) if exact is not None else float(costs.total(kept))
    return keep_of(chosen), predicted, float(values[chosen].sum())


# ----------------------------------------------------------------------------
# Measured latency


def _time_interpreter(interpreter, repeats, min_seconds, warmup=3):
    """Median milliseconds per `invoke()` over `repeats` timed loops."""
    for _ in range(warmup):
        interpreter.invoke()
    start = time.perf_counter()
    interpreter.invoke()
    single = time.perf_counter() - start
    calls = max(1, math.ceil(min_seconds / max(single, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            interpreter.invoke()
        samples.append((time.perf_counter() - start) / calls)
    return 1e3 * float(np.median(samples))


def tflite_latency(path, threads=1, repeats=7, min_seconds=0.1, seed=0):
    """The median latency of one call of a `.tflite` file in LiteRT, in milliseconds.

    The interpreter (default delegates, i.e. XNNPACK; `threads` threads)
    is given a random normal input of the file's shape (batch 1 for
    `export_tflite`'s default), warmed up with 3 calls, then timed in
    `repeats` loops of enough calls to last `min_seconds` each.

    Args:
        path: the `.tflite` file.
        threads: int >= 1. Defaults to 1.
        repeats: int >= 1, timed loops. Defaults to 7.
        min_seconds: float > 0, the least duration of a loop. Defaults to 0.1.
        seed: int, for the input.

    Returns:
        float, milliseconds per call (the median over the loops).
    """
    from ai_edge_litert.interpreter import Interpreter

    threads = check_positive_int(threads, "threads")
    repeats = check_positive_int(repeats, "repeats")
    interpreter = Interpreter(model_path=os.fspath(path), num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(seed)
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(
            detail["index"], rng.normal(size=detail["shape"]).astype(detail["dtype"]))
    return _time_interpreter(interpreter, repeats, min_seconds)


class LatencyTable:
    """Measured LiteRT latencies of single layers, cached in a JSON file.

    `layer_latency(layer, input_shape, lowering)` exports a model holding
    only a copy of `layer` (its weights, batch 1; `export.export_tflite` with
    the `lowering` for a `TransformConv2D`) and times it with
    `tflite_latency`. Results are keyed by the layer's class, configuration
    (name left out: layers of the same shape and assignment share an
    entry), input shape, lowering and thread count, kept in memory and, with
    `path`, in a JSON file that is read when the table is made and written
    after each new measurement. Entries stay valid across runs on the same
    machine; delete the file after changing the machine or the TFLite
    export.

    Args:
        path: optional cache file (JSON).
        threads: int >= 1, interpreter threads. Defaults to 1.
        repeats, min_seconds: as `tflite_latency` (defaults 5 and 0.05).

    Example:

    >>> import keras
    >>> table = LatencyTable()
    >>> ms = table.layer_latency(keras.layers.Conv2D(8, 3), (8, 8, 4))
    >>> ms > 0
    True
    """

    def __init__(self, path=None, threads=1, repeats=5, min_seconds=0.05):
        self.path = None if path is None else os.fspath(path)
        self.threads = check_positive_int(threads, "threads")
        self.repeats = check_positive_int(repeats, "repeats")
        self.min_seconds = float(min_seconds)
        self.entries = {}
        self.measured = 0
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.entries = json.load(f).get("entries", {})

    def key(self, layer, input_shape, lowering=None):
        """The cache key of a measurement."""
        config = dict(layer.get_config())
        config.pop("name", None)
        config.pop("dtype", None)
        text = json.dumps(
            [type(layer).__name__, config, [int(d) for d in input_shape], lowering,
             self.threads], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()

    def layer_latency(self, layer, input_shape, lowering=None):
        """Milliseconds per call of `layer` alone on one `input_shape` sample.

        Args:
            layer: a Keras layer (built or not; a built layer's weights are
                copied).
            input_shape: its input shape without the batch dimension.
            lowering: for a `TransformConv2D`, the form to export
                (`lowering.LOWERINGS`); None for other layers.
        """
        key = self.key(layer, input_shape, lowering)
        if key not in self.entries:
            self.entries[key] = self._measure(layer, tuple(input_shape), lowering)
            self.measured += 1
            self.save()
        return self.entries[key]["ms"]

    def _measure(self, layer, input_shape, lowering):
        from tf_transform_conv.export import export_tflite

        config = dict(layer.get_config())
        config["name"] = "layer"
        copy = type(layer).from_config(config)
        inputs = keras.Input(input_shape, batch_size=1)
        model = keras.Model(inputs, copy(inputs))
        if layer.built and layer.weights:
            copy.set_weights(layer.get_weights())
        with tempfile.TemporaryDirectory(prefix="tfconv-latency-") as folder:
            path = os.path.join(folder, "layer.tflite")
            result = export_tflite(
                model, path, lowering="auto" if lowering is None else lowering)
            ms = tflite_latency(path, self.threads, self.repeats, self.min_seconds)
        return {"ms": ms, "layer": type(layer).__name__, "input_shape": list(input_shape),
                "lowering": result.lowerings.get("layer", lowering), "bytes": result.bytes}

    def save(self):
        """Writes the cache file (atomically), when the table has one."""
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"threads": self.threads, "entries": self.entries}, f, indent=1)
        os.replace(tmp, self.path)
