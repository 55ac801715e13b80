"""Template selection: saliencies, global allocation, modulo assignment, batch-norm recalibration."""

import keras
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_transform_conv as tc
from tf_transform_conv.ops import assignment
from tf_transform_conv import pruning


def three_convs(seed=0, filters=(16, 24, 8)):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for index, count in enumerate(filters):
        x = keras.layers.Conv2D(count, 3, padding="same", name=f"conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 8, 8, 3)).astype("float32"), rng.integers(0, 4, 32)


def wrappers(model):
    return [l for l in model._flatten_layers(include_self=False)
            if isinstance(l, pruning.TransformPruning)]


def compile_fit(model, data, callback, epochs=1):
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback])


# ----------------------------------------------------------------------------
# Global allocation


def reference_allocation(saliencies, target, minimum):
    """Lowers one global threshold until `target` filters pass (each layer's top `minimum` always do)."""
    floors = [min(minimum, len(s)) for s in saliencies]
    forced = [set(np.argsort(-s, kind="stable")[:f]) for s, f in zip(saliencies, floors)]
    pool = sorted(
        ((-s[i], layer, i) for layer, s in enumerate(saliencies) for i in range(len(s))
         if i not in forced[layer]),
    )
    counts = list(floors)
    for _, layer, _ in pool[:max(0, target - sum(floors))]:
        counts[layer] += 1
    return counts


@pytest.mark.parametrize("seed", range(5))
def test_allocate_globally_matches_one_threshold(seed):
    rng = np.random.default_rng(seed)
    saliencies = [rng.gamma(2.0, scale, size=size)
                  for size, scale in ((16, 1.0), (24, 3.0), (8, 0.2), (5, 1.0))]
    for target in (4, 13, 30, 53):
        counts = assignment.allocate_globally(saliencies, target, minimum=3)
        assert counts == reference_allocation(saliencies, target, 3)
        assert sum(counts) == max(target, 3 * 4)
        assert all(3 <= c <= len(s) for c, s in zip(counts, saliencies))
    # The third layer's small filters lose to everyone else's.
    assert assignment.allocate_globally(saliencies, 20, 1)[2] == 1


def test_allocate_globally_rejects_bad_minimum():
    with pytest.raises(ValueError, match=r"Expected an int >= 1 or one per layer \(2\)"):
        assignment.allocate_globally([np.ones(3), np.ones(2)], 3, minimum=[1])


def test_global_pruning_reaches_the_overall_sparsity_at_every_step():
    model = three_convs()
    # Make conv1 matter: its filters are 10x larger, so it should keep more.
    conv1 = model.get_layer("conv1")
    conv1.kernel.assign(conv1.kernel * 10.0)
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.7, begin_step=0, end_step=6,
                                                    power=1, frequency=1)
    wrapped = tc.prune_model(
        model,
        schedule,
        reconstruction=tc.Reconstruction(criterion="magnitude", allocation="global", min_bases=3),
    )
    found = wrappers(wrapped)
    total = sum(w.layer.filters for w in found)
    previous = [w.layer.filters for w in found]
    masks = [np.asarray(w.reconstructed).copy() for w in found]
    for step in range(8):
        pruned = tc.update_pruning_step(wrapped, step)
        should, sparsity = schedule(step)
        kept = [len(w.kept) for w in found]
        if bool(should):
            assert sorted(pruned) == sorted(w.name for w in found)
            assert sum(kept) == assignment.kept_filters(total, float(sparsity))
        assert all(k >= 3 for k in kept)
        assert all(k <= p for k, p in zip(kept, previous)), "a layer's sparsity went down"
        for before, w in zip(masks, found):
            assert not (before & ~np.asarray(w.reconstructed)).any()
        previous, masks = kept, [np.asarray(w.reconstructed).copy() for w in found]
    # 14 kept of 48: the minimum binds for conv0 and conv2, conv1's large
    # filters take the rest.
    assert [len(w.kept) for w in found] == [3, 8, 3]


def test_global_wrappers_need_one_schedule():
    model = three_convs()
    first = tc.prune_model(
        model,
        tfmot.sparsity.keras.ConstantSparsity(0.5, 0),
        layers=["conv0"],
        reconstruction=tc.Reconstruction(allocation="global"),
    )
    second = tc.prune_model(
        first,
        tfmot.sparsity.keras.ConstantSparsity(0.7, 0),
        layers=["conv1"],
        reconstruction=tc.Reconstruction(allocation="global"),
    )
    with pytest.raises(ValueError, match="need one schedule"):
        tc.update_pruning_step(second, 0)


def test_subtract_mean_ranks_within_each_layer():
    model = three_convs()
    conv1 = model.get_layer("conv1")
    conv1.kernel.assign(conv1.kernel * 10.0)
    counts = {}
    for subtract in (False, True):
        wrapped = tc.prune_model(
            model,
            lambda step: (True, 0.5),
            reconstruction=tc.Reconstruction(criterion="magnitude", allocation="global", subtract_mean=subtract),
        )
        tc.update_pruning_step(wrapped, 0)
        counts[subtract] = [len(w.kept) for w in wrappers(wrapped)]
        assert sum(counts[subtract]) == assignment.kept_filters(48, 0.5)
    assert counts[False] == [1, 22, 1]  # raw norms: conv1 takes nearly everything
    assert counts[True][0] > 4 and counts[True][2] > 2, counts


def test_transform_model_global_allocation():
    model = three_convs()
    conv1 = model.get_layer("conv1")
    conv1.kernel.assign(conv1.kernel * 10.0)
    _, report = tc.transform_model(
        model,
        sparsity=0.6,
        reconstruction=tc.Reconstruction(criterion="magnitude", allocation="global", min_bases=4),
    )
    bases = [r.base_filters for r in report]
    assert sum(bases) == assignment.kept_filters(48, 0.6) == 19
    assert bases == [4, 11, 4]
    _, report = tc.transform_model(
        model, sparsity=0.9, reconstruction=tc.Reconstruction(min_bases=4))  # per layer, floored
    assert [r.base_filters for r in report] == [4, 4, 4]


# ----------------------------------------------------------------------------
# Saliencies and assignment


def test_magnitude_keeps_the_largest_l2_norms():
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 4, 10))
    kernel[..., 7] *= 5
    kernel[..., 2] *= 4
    # l1 and l2 disagree on filter 5: one large tap against many small ones.
    kernel[..., 5] = 0.0
    kernel[1, 1, 0, 5] = 30.0
    fit = assignment.fit_assignment(kernel, 3, criterion="magnitude")
    norms = np.sqrt((kernel**2).sum(axis=(0, 1, 2)))
    np.testing.assert_array_equal(fit.bases, np.sort(np.argsort(-norms)[:3]))
    assert 5 in fit.bases
    assert 5 not in assignment.fit_assignment(kernel, 3, criterion="l1").bases


@pytest.mark.parametrize("depth_groups", [1, 2])
def test_modulo_gives_output_o_the_kept_filter_o_mod_n(depth_groups):
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(3, 3, 4, 11))
    fit = assignment.fit_assignment(kernel, 4, criterion="magnitude", assign="modulo",
                                    depth_groups=depth_groups)
    table = np.asarray(fit.assignment)
    bases = np.asarray(fit.bases)
    for o in range(11):
        expected = np.flatnonzero(bases == o)[0] if o in bases else o % 4
        assert (table[:, o, 0] == expected).all(), (o, table[:, o, 0])
    # Its transform and scale are still the best for that base: the error
    # cannot beat the free choice of base.
    free = assignment.fit_assignment(kernel, 4, criterion="magnitude", depth_groups=depth_groups)
    np.testing.assert_array_equal(free.bases, fit.bases)
    assert assignment.reconstruction_error(kernel, fit) >= \
        assignment.reconstruction_error(kernel, free) - 1e-12


def test_taylor_ranks_a_filter_with_zero_gradient_last(data):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    head = model.get_layer("head")
    weights = np.asarray(head.kernel).copy()
    weights[2] = 0.0  # filter 2 reaches nothing: its gradient is zero
    head.kernel.assign(weights)
    wrapped = tc.prune_model(
        model, lambda step: (True, 0.2), reconstruction=tc.Reconstruction(criterion="taylor"))
    wrapped.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    scores = tc.pruning.taylor_scores(wrapped, data, num_batches=2, batch_size=8)
    values = scores[wrappers(wrapped)[0].name]
    assert values[2] == 0.0 and (np.delete(values, 2) > 0).all()
    tc.update_pruning_step(wrapped, 0, scores=scores)
    wrapper = wrappers(wrapped)[0]
    assert list(wrapper.kept) == [0, 1, 3, 4, 5]  # 6 - round(1.2) = 5 kept, filter 2 went


def test_taylor_through_the_callback_and_its_errors(data):
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=1, frequency=100)
    wrapped = tc.prune_model(
        three_convs(), schedule, reconstruction=tc.Reconstruction(criterion="taylor"))
    with pytest.raises(ValueError, match=r"saliency_data=\(x, y\)"):
        compile_fit(wrapped, data, tc.UpdateTransformPruningStep())
    with pytest.raises(ValueError, match="needs gradients on data"):
        tc.update_pruning_step(wrapped, 1)
    compile_fit(wrapped, data, tc.UpdateTransformPruningStep(saliency_data=data,
                                                             saliency_batches=2))
    assert [len(w.kept) for w in wrappers(wrapped)] == [8, 12, 4]
    with pytest.raises(ValueError, match="Expected a positive int"):
        tc.UpdateTransformPruningStep(saliency_batches=0)
    with pytest.raises(ValueError, match="one-shot conversion does not take"):
        tc.transform_model(
            three_convs(), sparsity=0.5, reconstruction=tc.Reconstruction(criterion="taylor"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(allocation="layerwise"),
         "Expected one of ['per_layer', 'global']. Received allocation='layerwise'."),
        (dict(min_bases=0), "Expected an int >= 1. Received min_bases=0."),
        (dict(min_bases=2.5), "Received min_bases=2.5."),
        (dict(assign="nearest"), "Expected one of ['fit', 'modulo']. Received assign='nearest'."),
        (dict(subtract_mean="yes"), "Expected True or False. Received subtract_mean='yes'."),
        (dict(subtract_mean=True),
         "needs allocation='global' (per layer, a shift changes no ranking). Received "
         "subtract_mean=True with allocation='per_layer'."),
    ],
)
def test_selection_arguments_are_checked(kwargs, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        tc.prune_model(three_convs(), lambda step: (True, 0.5), tc.Reconstruction(**kwargs))
    with pytest.raises(ValueError, match=re.escape(message)):
        tc.transform_model(three_convs(), sparsity=0.5, reconstruction=tc.Reconstruction(**kwargs))


def test_min_bases_that_keep_whole_layers_warn_and_the_others_prune(data):
    rec = tc.Reconstruction(min_bases=16, criterion="magnitude")
    with pytest.warns(UserWarning, match=r"prune_model: min_bases=16 is at least the filters "
                      r"of 'conv0' \(16\), 'conv2' \(8\), so they keep every filter") as caught:
        wrapped = tc.prune_model(three_convs(), tfmot.sparsity.keras.ConstantSparsity(0.75, 0),
                                 rec)
    assert caught[0].filename == __file__
    compile_fit(wrapped, data, tc.UpdateTransformPruningStep())
    # What it warns about: those layers stay whole, conv1 (24 filters) keeps its 16.
    assert [w.sparsity for w in wrappers(wrapped)] == [0.0, pytest.approx(8 / 24), 0.0]
    with pytest.warns(UserWarning, match=r"transform_model: min_bases=16 .* 'conv0' \(16\)"):
        tc.transform_model(three_convs(), sparsity=0.75, reconstruction=rec)


def test_new_options_round_trip_through_keras_files(data, tmp_path):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=7,
                                                    power=1, frequency=2)
    options = dict(criterion="magnitude", allocation="global", min_bases=2, assign="modulo",
                   subtract_mean=True, transform_family="scalar")
    wrapped = tc.prune_model(three_convs(), schedule, tc.Reconstruction(**options))
    compile_fit(wrapped, data, tc.UpdateTransformPruningStep())  # steps 0..3
    wrapped.save(tmp_path / "w.keras")
    loaded = keras.saving.load_model(tmp_path / "w.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(data[0]), wrapped(data[0]), rtol=1e-5, atol=1e-6)
    for before, after in zip(wrappers(wrapped), wrappers(loaded)):
        for key, value in options.items():
            assert getattr(after.reconstruction, key) == value, key
        assert int(np.asarray(after.pruning_step)) == 3
        np.testing.assert_array_equal(after.reconstructed, before.reconstructed)
    compile_fit(loaded, data, tc.UpdateTransformPruningStep())  # steps 4..7 prune at 4, 6
    found = wrappers(loaded)
    assert sum(len(w.kept) for w in found) == assignment.kept_filters(48, float(schedule(6)[1]))
    assert [h["step"] for h in found[0].pruning_history] == [4, 6]


# ----------------------------------------------------------------------------
# Batch-norm recalibration


def test_recalibration_averages_the_batch_statistics():
    rng = np.random.default_rng(5)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="conv"),
                              keras.layers.BatchNormalization(momentum=0.9, name="bn")])
    bn = model.get_layer("bn")
    x = rng.normal(1.0, 2.0, size=(40, 6, 6, 2)).astype("float32")
    assert tc.recalibrate_batch_norm(model, x, num_batches=3, batch_size=10) == 1
    conv = np.asarray(model.get_layer("conv")(x))  # no BN in between: exact outputs
    means = [conv[i:i + 10].mean(axis=(0, 1, 2)) for i in (0, 10, 20)]
    variances = [conv[i:i + 10].var(axis=(0, 1, 2)) for i in (0, 10, 20)]
    np.testing.assert_allclose(bn.moving_mean, np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance, np.mean(variances, axis=0), rtol=1e-4)
    assert bn.momentum == 0.9
    with pytest.raises(ValueError, match="Expected a positive int"):
        tc.recalibrate_batch_norm(model, x, num_batches=0)
    with pytest.raises(ValueError, match="yielded no batch"):
        tc.recalibrate_batch_norm(model, x[:0])


def test_transform_model_and_pruning_step_recalibrate(data):
    model = three_convs()
    plain, _ = tc.transform_model(model, sparsity=0.75)
    fresh, _ = tc.transform_model(model, sparsity=0.75, recalibrate=data, recalibrate_batches=2,)
    reference, _ = tc.transform_model(model, sparsity=0.75)
    tc.recalibrate_batch_norm(reference, data[0], num_batches=2)
    for name in ("bn0", "bn1", "bn2"):
        np.testing.assert_allclose(fresh.get_layer(name).moving_mean,
                                   reference.get_layer(name).moving_mean, rtol=1e-5, atol=1e-6)
        assert not np.allclose(fresh.get_layer(name).moving_mean,
                               plain.get_layer(name).moving_mean)

    schedule = tfmot.sparsity.keras.ConstantSparsity(0.75, begin_step=0, frequency=100)
    wrapped = tc.prune_model(model, schedule)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.0),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    wrapped.fit(*data, batch_size=32, epochs=1, verbose=0, callbacks=[
        tc.UpdateTransformPruningStep(recalibrate_data=data[0], recalibrate_batches=1)])
    # The step recalibrated on the whole batch, then the training batch moved
    # the statistics by the layer's momentum toward the same batch's statistics.
    expected = wrapped.get_layer("bn2").moving_mean
    check = tc.strip_model(wrapped)
    tc.recalibrate_batch_norm(check, data[0], num_batches=1)
    np.testing.assert_allclose(expected, check.get_layer("bn2").moving_mean, rtol=1e-4,
                               atol=1e-5)
