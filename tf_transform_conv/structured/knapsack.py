"""Structured removal under a budget: which channels to keep, as a knapsack.

Aflalo et al., "Knapsack Pruning with Inner Distillation" (2020), choose the
filters a network keeps as a 0/1 knapsack: each filter (or each coupled set
of channels, such as the channels of one residual stream) is an item whose
*value* is its importance, the first-order Taylor estimate
`sum |w * dL/dw|` over its weights accumulated over batches of data
(`saliency.filter_importance`), and whose *weight* is what keeping it costs
(parameters, multiply-adds or measured latency, `channel_costs`); the
capacity is the budget.

`knapsack_removal(model, data, budget, cost=...)` puts it together on a
Keras model: it finds the coupled channel groups
(`graph.groups.channel_groups`), scores their channels, solves the knapsack
(`tf_transform_conv.knapsack`) and removes what is not chosen
(`remove_filters`). A latency budget reads single-layer latencies from a
table the caller passes (`export.LatencyTable`).
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import is_number
from tf_transform_conv.cost import model_cost
from tf_transform_conv.graph.groups import channel_groups
from tf_transform_conv.knapsack import check_method
from tf_transform_conv.knapsack import solve_knapsack
from tf_transform_conv.saliency import filter_importance
from tf_transform_conv.saliency import group_importance
from tf_transform_conv.structured.removal import removal_cost
from tf_transform_conv.structured.removal import remove_filters

__all__ = ["COSTS", "GroupCosts", "KnapsackRemoval", "channel_costs", "knapsack_removal"]

#: What a channel's knapsack weight can count.
COSTS = ("params", "macs", "latency")


def _layer_totals(model, cost, latency_table=None):
    """`{layer name: cost}` of every layer of `model` (summed over its calls)."""
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
        groups: its `graph.groups.ChannelGroup`s (computed when None); only
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
        groups = channel_groups(model)
    prunable = [g for g in groups if g.prunable]
    totals = _layer_totals(model, cost, latency_table)
    return GroupCosts(prunable, totals, fixed or 0.0)


@dataclasses.dataclass
class KnapsackRemoval:
    """What `knapsack_removal` chose.

    Attributes:
        keep: dict, group name -> sorted kept channel indices (as
            `remove_filters` takes).
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


def knapsack_removal(model, data, budget=None, cost="params", target=None, method="exact",
                     num_batches=8, batch_size=32, min_channels=1, latency_table=None,
                     fixed_latency=None, importance=None, normalize=None):
    """Removes the filters a knapsack finds least worth their cost.

    Every prunable channel group of the model
    (`graph.groups.channel_groups`: the channels one convolution writes, or
    every channel of a residual stream written by several, as one group) is
    a set of items, one per channel: its value is the importance of the
    channel summed over the group's producers (`filter_importance`,
    `sum |w * dL/dw|`), its weight its cost (`channel_costs`: parameters,
    multiply-adds, or measured LiteRT latency, each layer's cost shared
    among the groups it connects). The 0/1 knapsack (`solve_knapsack`)
    keeps the channels of most total importance whose cost fits the budget,
    each group keeping at least `min_channels` (its most important ones);
    the others are removed with `remove_filters`. The knapsack's
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
        num_batches: batches of `data` the importance is summed over.
        batch_size: the size of those batches.
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
    check_method(method)
    min_channels = check_positive_int(min_channels, "min_channels")
    if normalize not in (None, "l2"):
        raise ValueError(
            "Invalid value for argument `normalize`. Expected None or 'l2'. "
            f"Received normalize={normalize!r}.")
    groups = [g for g in channel_groups(model) if g.prunable]
    costs = channel_costs(model, groups, cost, latency_table,
                          fixed_latency if cost == "latency" else None)
    dense = costs.dense()
    target = float(target if target is not None else budget * dense)
    if importance is None:
        importance = filter_importance(model, data, num_batches=num_batches,
                                       batch_size=batch_size)
    scores = group_importance(model, groups, importance, "knapsack_removal()")
    if normalize == "l2":
        scores = {name: v / max(float(np.linalg.norm(v)), 1e-30) for name, v in scores.items()}
    exact = None
    if cost != "latency":
        def exact(keep):
            counted = removal_cost(model, keep)
            return float(counted.params if cost == "params" else counted.macs)
    keep, predicted, value = _choose(groups, costs, scores, target, method, min_channels,
                                     exact)
    new_model = remove_filters(model, keep)
    return new_model, KnapsackRemoval(keep, cost, dense, target, predicted, value, scores)


def _choose(groups, costs, scores, target, method, min_channels, exact=None):
    """The kept channels per group: knapsack over the linearised costs, capacity bisected.

    The capacity is bisected against `costs.total`; then, if `exact(keep)`
    (the cost `removal_cost` reports) still exceeds the target,
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
