"""Budgets for TransformConv2D: the plan, transform_model / prune_model with a budget."""

import keras
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_transform_conv as tc
from tf_transform_conv.budget import Budget
from tf_transform_conv.budget import plan_budget
from tf_transform_conv.cost import model_cost
from tf_transform_conv.pruning.schedules import ScaledSchedule
from tf_transform_conv.saliency import filter_importance


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 8))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="a")(inputs)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="b")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", name="c")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 8, 8, 8)).astype("float32"), rng.integers(0, 4, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "one or two of `params`, `macs` or `latency`"),
        (dict(params=0.3, macs=0.3, latency=0.5), "one or two of"),
        (dict(params=0.0), r"`params`\. Expected a fraction in \(0, 1\]"),
        (dict(latency=1.2), r"`latency`\. Expected a fraction"),
        (dict(params=0.5, base_ratios=()), "`base_ratios`"),
        (dict(params=0.5, lowerings=("fast",)), "`lowerings`"),
        (dict(params=0.5, method="dp"), "`method`"),
    ],
)
def test_budget_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_params_plan_is_exact_in_the_converted_model(fraction, method):
    model = small_model()
    plan = plan_budget(model, Budget(params=fraction, method=method))
    assert plan.dense_cost == model_cost(model).params
    assert plan.predicted_cost <= plan.target == pytest.approx(fraction * plan.dense_cost)
    new, report = tc.transform_model(model, budget=plan)
    assert model_cost(new).params == plan.predicted_cost
    converted = {r.name: r.base_filters for r in report if r.converted}
    assert converted == plan.bases


# A learned family's operators cost parameters (and multiply-adds): the plan prices them,
# so the layers the reconstruction builds meet the budget it planned.
@pytest.mark.parametrize("family", ["scalar", "affine", "general"])
@pytest.mark.parametrize("kind", ["params", "macs"])
def test_plan_prices_the_learned_family_the_layers_are_built_with(family, kind):
    model = small_model()
    reconstruction = tc.Reconstruction(transforms="identity", transform_family=family)
    plan = plan_budget(model, Budget(**{kind: 0.7}), reconstruction=reconstruction)
    assert plan.bases  # something is converted
    new, _ = tc.transform_model(model, reconstruction=reconstruction, budget=plan)
    cost = model_cost(new)
    if kind == "params":
        spent = cost.params
    else:  # on the factored path, as the plan prices it, whichever path runs here
        paths = {l.name: l.cost(tuple(l.input.shape[1:])) for l in new.layers
                 if isinstance(l, tc.TransformConv2D)}
        spent = sum(paths[e.name]["factored_macs"] + paths[e.name]["transform_macs"]
                    if e.name in paths else e.macs for e in cost.layers)
    assert spent == plan.predicted_cost <= plan.target


def test_exact_plan_is_worth_at_least_the_greedy_one():
    model = small_model()
    exact = plan_budget(model, Budget(params=0.4))
    greedy = plan_budget(model, Budget(params=0.4, method="greedy"))
    assert sum(c.value for c in exact.choices) >= sum(c.value for c in greedy.choices) - 1e-9


def test_full_budget_keeps_every_layer_dense():
    model = small_model()
    plan = plan_budget(model, Budget(macs=1.0))
    assert plan.bases == {} and plan.predicted_cost == plan.dense_cost


def test_importance_weights_the_layers(labelled):
    model = small_model()
    importance = filter_importance(model, labelled, num_batches=1)
    plan = plan_budget(model, Budget(params=0.5), importance=importance)
    for choice in plan.choices:
        weight = importance[choice.name].sum()
        assert choice.value == pytest.approx(weight * (1 - choice.error ** 2))


def test_budget_below_cheapest_choice_raises():
    model = small_model()
    with pytest.raises(ValueError, match="below the cheapest choice"):
        plan_budget(model, Budget(params=0.01))


def test_transform_model_per_layer_base_ratio():
    model = small_model()
    new, report = tc.transform_model(model, base_ratio={"a": 0.25, "c": 0.5})
    bases = {r.name: r.base_filters for r in report}
    assert bases == {"a": 8, "b": None, "c": 16}
    assert type(new.get_layer("b")).__name__ == "Conv2D"
    with pytest.raises(ValueError, match=r"exactly one of `base_ratio` or `sparsity` \(or `budget`\)"):
        tc.transform_model(model, base_ratio=0.5, budget=Budget(params=0.5))
    with pytest.raises(ValueError, match="`base_ratio`. Expected a number in"):
        tc.transform_model(model, base_ratio={"a": 2})


class FakeLatencyTable:
    """Latencies proportional to the stored weights, the slices form 10% slower."""

    def layer_latency(self, layer, input_shape, lowering=None):
        size = sum(int(np.prod(w.shape)) for w in layer.weights) if layer.built else (
            3 * 3 * input_shape[-1] * layer.filters)
        return 1e-4 * size * (1.1 if lowering == "slices" else 1.0)


def test_latency_plan_records_lowerings_for_export(tmp_path):
    model = small_model()
    dense = sum(FakeLatencyTable().layer_latency(l, None) for l in model.layers
                if l.name in "abc" and len(l.name) == 1) + 0.05
    plan = plan_budget(model, Budget(latency=0.5), latency_table=FakeLatencyTable(),
                       dense_latency=dense)
    assert plan.predicted_cost <= plan.target
    assert plan.fixed_cost == pytest.approx(0.05)
    assert plan.bases and set(plan.lowerings.values()) == {"grouped"}  # slices cost more
    new, _ = tc.transform_model(model, budget=plan)
    result = tc.export_tflite(new, tmp_path / "m.tflite", lowering=plan.lowerings)
    assert result.lowerings == plan.lowerings


def test_latency_measured_alone_is_scaled_to_the_model():
    model = small_model()
    table = FakeLatencyTable()
    alone = sum(table.layer_latency(l, None) for l in model.layers if l.name in ("a", "b", "c"))
    plan = plan_budget(model, Budget(latency=0.6), latency_table=table, dense_latency=alone / 2)
    assert plan.fixed_cost == 0
    assert sum(c.dense_cost for c in plan.choices) == pytest.approx(alone / 2)
    assert plan.predicted_cost <= plan.target == pytest.approx(0.3 * alone)


@pytest.mark.parametrize("second", [0.35, 0.5])
def test_two_part_budget_meets_both(second):
    model = small_model()
    table = FakeLatencyTable()
    alone = sum(table.layer_latency(l, None) for l in model.layers if l.name in ("a", "b", "c"))
    budget = Budget(latency=0.8, params=second)
    assert (budget.kind, budget.secondary) == ("latency", "params")
    plan = plan_budget(model, budget, latency_table=table, dense_latency=alone)
    assert plan.predicted_cost <= plan.target
    assert plan.secondary["predicted_cost"] <= plan.secondary["target"]
    new, _ = tc.transform_model(model, budget=plan)
    assert model_cost(new).params == plan.secondary["predicted_cost"]
    assert model_cost(new).params <= second * model_cost(model).params


def test_prune_model_with_budget_reaches_the_plan(tmp_path):
    model = small_model()
    plan = plan_budget(model, Budget(params=0.5))
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.7, 0, 4, power=1, frequency=2)
    pruned = tc.prune_model(model, schedule, budget=plan)
    wrapped = {l.layer.name for l in pruned.layers if isinstance(l, tc.TransformPruning)}
    assert wrapped == set(plan.bases)
    pruned.compile(optimizer="adam",
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 8, 8, 8)).astype("float32"), rng.integers(0, 4, 48)
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0,
               callbacks=[tc.UpdateTransformPruningStep()])
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    schedules = [l.schedule for l in reloaded.layers if isinstance(l, tc.TransformPruning)]
    assert all(isinstance(s, ScaledSchedule) for s in schedules)
    stripped = tc.strip_model(pruned)
    bases = {l.name: l.base_filters for l in stripped.layers
             if type(l).__name__ == "TransformConv2D"}
    assert bases == plan.bases
    assert model_cost(stripped).params == plan.predicted_cost


def test_prune_model_budget_needs_a_final_sparsity():
    model = small_model()
    with pytest.raises(ValueError, match="must state a final sparsity"):
        tc.prune_model(model, lambda step: (True, 0.5), budget=Budget(params=0.5))
