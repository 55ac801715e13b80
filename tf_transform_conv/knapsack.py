"""Knapsack solvers on plain arrays: which items (or which option per group) fit a budget.

- `solve_knapsack(values, weights, capacity, method="exact")`: the 0/1
  knapsack, exactly by dynamic programming over integer weights (real
  weights are scaled and rounded *up*, so the chosen set never exceeds the
  capacity in the original units), or greedily by value density with the
  best-single-item fix, which guarantees at least half the optimum.
- `solve_multiple_choice(values, costs, capacity, method="exact")`: one
  option per group (as `tf_transform_conv.budget` uses to choose each
  layer's bases and lowering), by dynamic programming over the discretised
  cost, or greedily along each group's upper convex hull.

Numpy only: structured removal under a budget
(`structured.knapsack_removal`) and budgets (`budget.plan_budget`) build
their items on Keras models and call these.
"""

import math

import numpy as np

from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import is_number

__all__ = ["METHODS", "solve_knapsack", "solve_multiple_choice"]

METHODS = ("exact", "greedy")

# The exact solvers' table: at most this many cells (items x capacity units).
_MAX_CELLS = 40_000_000
_MAX_UNITS = 1_000_000


def check_method(method):
    """Raises a ValueError unless `method` is one of `METHODS`."""
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
    check_method(method)
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
    check_method(method)
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


# ----------------------------------------------------------------------------
# Costs of channel groups


# ----------------------------------------------------------------------------
# Removal


# ----------------------------------------------------------------------------
# Measured latency


