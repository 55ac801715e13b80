"""Knapsack allocation: the solvers against brute force, importance, costs, removal."""

import itertools
import json

import keras
import numpy as np
import pytest

from tf_transform_conv.export import LatencyTable
from tf_transform_conv.knapsack import solve_knapsack
from tf_transform_conv.knapsack import solve_multiple_choice
from tf_transform_conv.saliency import filter_importance
from tf_transform_conv.structured import knapsack_removal
from tf_transform_conv.structured import knapsack as knapsack_removal_lib


def brute_force(values, weights, capacity):
    """The best total value over every subset within the capacity."""
    best = 0.0
    n = len(values)
    for mask in range(1 << n):
        chosen = [i for i in range(n) if mask >> i & 1]
        if sum(weights[i] for i in chosen) <= capacity:
            best = max(best, sum(values[i] for i in chosen))
    return best


def brute_force_multiple(values, costs, capacity):
    best = -np.inf
    for choice in itertools.product(*[range(len(v)) for v in values]):
        if sum(c[j] for c, j in zip(costs, choice)) <= capacity:
            best = max(best, sum(v[j] for v, j in zip(values, choice)))
    return best


def random_instance(rng, n, integral):
    values = rng.uniform(0, 10, n)
    if integral:
        weights = rng.integers(1, 12, n).astype(float)
        capacity = float(rng.integers(0, int(weights.sum()) + 1))
    else:
        weights = rng.uniform(0.05, 3.0, n)
        capacity = float(rng.uniform(0, weights.sum()))
    return values, weights, capacity


@pytest.mark.parametrize("seed", range(40))
def test_exact_equals_brute_force_integer_weights(seed):
    rng = np.random.default_rng(seed)
    values, weights, capacity = random_instance(rng, int(rng.integers(1, 11)), True)
    chosen = solve_knapsack(values, weights, capacity)
    assert weights[chosen].sum() <= capacity
    np.testing.assert_allclose(values[chosen].sum(), brute_force(values, weights, capacity),
                               rtol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_exact_real_weights_within_budget_and_near_optimal(seed):
    # Real weights are rounded up to 10,000 units of the capacity: each chosen
    # item can lose at most 1e-4 of the capacity, so the optimum of a budget
    # shrunk by n * 1e-4 * capacity is always reachable.
    rng = np.random.default_rng(100 + seed)
    values, weights, capacity = random_instance(rng, 10, False)
    chosen = solve_knapsack(values, weights, capacity, resolution=10_000)
    assert weights[chosen].sum() <= capacity
    assert values[chosen].sum() <= brute_force(values, weights, capacity) + 1e-9
    shrunk = capacity * (1 - 10 * 1e-4)
    assert values[chosen].sum() >= brute_force(values, weights, shrunk) - 1e-9


@pytest.mark.parametrize("seed", range(40))
def test_greedy_within_half_of_optimum(seed):
    rng = np.random.default_rng(200 + seed)
    values, weights, capacity = random_instance(rng, int(rng.integers(1, 11)), seed % 2 == 0)
    chosen = solve_knapsack(values, weights, capacity, method="greedy")
    assert weights[chosen].sum() <= capacity
    assert values[chosen].sum() >= 0.5 * brute_force(values, weights, capacity) - 1e-9


def test_greedy_half_bound_is_tight_and_single_item_fix_matters():
    # Density order takes the small item first and the large one no longer fits:
    # without the best-single-item comparison the greedy would get 2 of 100.
    values, weights = np.array([2.0, 100.0]), np.array([1.0, 100.0])
    assert list(solve_knapsack(values, weights, 100.0, method="greedy")) == [1]
    assert list(solve_knapsack(values, weights, 100.0)) == [1]


def test_free_items_taken_worthless_items_left():
    chosen = solve_knapsack([5.0, 0.0, -1.0, 3.0], [0.0, 1.0, 1.0, 10.0], 2.0)
    assert list(chosen) == [0]
    assert list(solve_knapsack([1.0, 2.0], [1.0, 1.0], 0.0)) == []


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_multiple_choice_against_brute_force(seed, method):
    rng = np.random.default_rng(300 + seed)
    groups = int(rng.integers(1, 5))
    values = [rng.uniform(0, 10, int(rng.integers(1, 5))) for _ in range(groups)]
    costs = [rng.integers(0, 8, len(v)).astype(float) for v in values]
    floor = sum(c.min() for c in costs)
    capacity = float(floor + rng.integers(0, 12))
    choice = solve_multiple_choice(values, costs, capacity, method=method)
    assert len(choice) == groups
    total_cost = sum(c[j] for c, j in zip(costs, choice))
    assert total_cost <= capacity
    total = sum(v[j] for v, j in zip(values, choice))
    best = brute_force_multiple(values, costs, capacity)
    if method == "exact":
        np.testing.assert_allclose(total, best, rtol=1e-12)
    else:
        assert total <= best + 1e-9


def test_multiple_choice_real_costs_never_exceed_capacity():
    rng = np.random.default_rng(7)
    values = [rng.uniform(0, 1, 5) for _ in range(30)]
    costs = [rng.uniform(-0.2, 2.0, 5) for _ in range(30)]
    capacity = sum(c.min() for c in costs) + 7.3
    for method in ("exact", "greedy"):
        choice = solve_multiple_choice(values, costs, capacity, method=method)
        assert sum(c[j] for c, j in zip(costs, choice)) <= capacity


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: solve_knapsack([1, 2], [1], 3), "same length"),
        (lambda: solve_knapsack([1], [-1], 3), r"`weights`\. Expected numbers >= 0"),
        (lambda: solve_knapsack([1], [1], -1), r"`capacity`\. Expected a finite number >= 0"),
        (lambda: solve_knapsack([1], [1], 1, method="dp"), r"`method`\. Expected one of"),
        (lambda: solve_knapsack([[1]], [[1]], 1), r"`values`\. Expected a 1-D"),
        (lambda: solve_multiple_choice([[1]], [[5]], 2), "below the cheapest choice"),
        (lambda: solve_multiple_choice([[]], [[]], 2), "at least one option"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------
# Importance


def test_filter_importance_equals_numpy():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(2, name="head")])
    model.compile(loss=keras.losses.MeanSquaredError())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 5, 2)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    scores = filter_importance(model, (x, y), num_batches=2, batch_size=3)
    # Reference: numpy gradient of the mean squared error through conv -> dense.
    kernel, bias = (np.asarray(w, "float64") for w in model.get_layer("conv").weights)
    dense_w, dense_b = (np.asarray(w, "float64") for w in model.get_layer("head").weights)
    expected = np.zeros(3)
    for batch in (slice(0, 3), slice(3, 6)):
        xb, yb = x[batch].astype("float64"), y[batch].astype("float64")
        patches = np.stack([xb[:, i:i + 3, j:j + 3, :] for i in range(3) for j in range(3)], 1)
        conv = np.einsum("bpuvc,uvco->bpo", patches, kernel) + bias  # (b, 9 pixels, 3)
        out = conv.reshape(len(xb), -1) @ dense_w + dense_b
        d_out = 2 * (out - yb) / out.size
        d_conv = (d_out @ dense_w.T).reshape(conv.shape)
        grad = np.einsum("bpuvc,bpo->uvco", patches, d_conv)
        expected += np.abs(kernel * grad).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(scores["conv"], expected / 2, rtol=1e-4)


def test_filter_importance_needs_compiled_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="compile the model"):
        filter_importance(model, (np.ones((2, 4)), np.ones((2, 2))))


# ----------------------------------------------------------------------------
# Costs


class Group:
    """A stand-in for `structured.ChannelGroup` (the fields `GroupCosts` reads)."""

    def __init__(self, name, producers, consumers, channels):
        self.name, self.producers, self.consumers = name, producers, consumers
        self.channels, self.prunable = tuple(range(channels)), True


def test_group_costs_bound_the_exact_cost():
    # conv1 (3 -> A), bn1 (A), conv2 (A -> B), head (B -> 10): params
    groups = [Group("A", ["conv1"], ["bn1", "conv2"], 8), Group("B", ["conv2"], ["head"], 6)]
    totals = {"conv1": 9 * 3 * 8, "bn1": 4 * 8, "conv2": 9 * 8 * 6, "head": 6 * 10, "x": 7}
    costs = knapsack_removal_lib.GroupCosts(groups, totals, fixed=0)
    assert costs.dense() == sum(totals.values())
    kept = np.array([4, 3])
    exact = 7 + 9 * 3 * 4 + 4 * 4 + 9 * 4 * 3 + 3 * 10
    assert costs.total(kept) == exact
    assert costs.fixed + (kept * costs.per_channel).sum() >= exact
    np.testing.assert_allclose(costs.fixed + (costs.widths * costs.per_channel).sum(),
                               costs.dense())


def test_latency_table_caches(tmp_path):
    path = tmp_path / "latency.json"
    table = LatencyTable(path, repeats=2, min_seconds=0.005)
    conv = keras.layers.Conv2D(8, 3, name="a")
    first = table.layer_latency(conv, (8, 8, 4))
    assert first > 0 and table.measured == 1
    again = LatencyTable(path)
    # Another name, same configuration: the cached entry.
    assert again.layer_latency(keras.layers.Conv2D(8, 3, name="b"), (8, 8, 4)) == first
    assert again.measured == 0
    assert len(json.loads(path.read_text())["entries"]) == 1


# ----------------------------------------------------------------------------
# Removal


def residual_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    y = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="conv_a")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="conv_b")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 8, 8, 3)).astype("float32"), rng.integers(0, 4, 32)


@pytest.mark.parametrize("cost", ["params", "macs"])
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_knapsack_removal_meets_budget(labelled, cost, method):
    from tf_transform_conv.cost import model_cost

    model = residual_model()
    small, removal = knapsack_removal(model, labelled, budget=0.5, cost=cost,
                                               method=method, num_batches=2)
    before, after = model_cost(model), model_cost(small)
    measured = after.params if cost == "params" else after.macs
    dense = before.params if cost == "params" else before.macs
    assert measured <= 0.5 * dense
    assert measured == removal.predicted_cost
    assert measured >= 0.4 * dense  # the budget is used, not just respected
    # The residual stream (stem + conv_b) is one group: both keep the same channels.
    assert small.get_layer("stem").filters == small.get_layer("conv_b").filters
    assert small.get_layer("stem").filters == len(removal.keep["stem"])


def test_knapsack_removal_keeps_most_important_channels(labelled):
    model = residual_model()
    importance = filter_importance(model, labelled, num_batches=2)
    _, removal = knapsack_removal(model, labelled, budget=0.6,
                                           importance=importance)
    scores = removal.importance["conv_a"]
    np.testing.assert_allclose(scores, importance["conv_a"])
    kept = removal.keep["conv_a"]
    dropped = np.setdiff1d(np.arange(24), kept)
    # Same weight for every channel of a group: the kept ones are the most important.
    if len(dropped):
        assert scores[kept].min() >= scores[dropped].max()
    stream = importance["stem"] + importance["conv_b"]
    np.testing.assert_allclose(removal.importance["stem"], stream)


def test_knapsack_removal_full_budget_changes_nothing(labelled):
    model = residual_model()
    small, removal = knapsack_removal(model, labelled, budget=1.0, num_batches=1)
    assert all(len(v) == w for v, w in zip(removal.keep.values(), (16, 24)))
    x = labelled[0][:4]
    np.testing.assert_allclose(small.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)


def test_knapsack_removal_bad_budget(labelled):
    model = residual_model()
    with pytest.raises(ValueError, match="exactly one of `budget`"):
        knapsack_removal(model, labelled)
    with pytest.raises(ValueError, match=r"`budget`\. Expected a fraction in \(0, 1\]"):
        knapsack_removal(model, labelled, budget=1.5)
    with pytest.raises(ValueError, match="nothing fits"):
        knapsack_removal(model, labelled, target=10, num_batches=1)


def test_knapsack_removal_l2_normalisation(labelled):
    model = residual_model()
    importance = filter_importance(model, labelled, num_batches=2)
    _, removal = knapsack_removal(model, None, budget=0.5, importance=importance,
                                           normalize="l2")
    for name, scores in removal.importance.items():
        np.testing.assert_allclose(np.linalg.norm(scores), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="`normalize`. Expected None or 'l2'"):
        knapsack_removal(model, None, budget=0.5, importance=importance,
                                  normalize="l1")
