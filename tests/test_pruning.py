"""Generalised pruning: the wrapper, the callbacks, tfmot schedules, strip_model."""

import glob

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tf_transform_conv as tc
from tf_transform_conv import cost
from tf_transform_conv import pruning
from tf_transform_conv import TransformConv2D


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inputs)
    y = keras.layers.Conv2D(16, 3, padding="same", name="conv_b")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.Conv2D(8, 1, name="pointwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 8, 8, 4)).astype("float32"), rng.integers(0, 4, 32)


def compile_fit(model, data, epochs=1, batch_size=8, callbacks=None):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model.fit(*data, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks if callbacks is not None else [tc.UpdateTransformPruningStep()])


def wrappers(model):
    return [l for l in model._flatten_layers(include_self=False) if isinstance(l, pruning.TransformPruning)]


def assert_close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1e-12, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


def test_kept_filters_rounding():
    assert pruning.kept_filters(16, 0.75) == 4
    assert pruning.kept_filters(10, 0.25) == 7  # 2.5 rounds half up to 3 replaced
    assert pruning.kept_filters(4, 0.99) == 1  # at least one base


def test_wraps_default_layers_and_sparsity_zero_is_exact(data):
    model = small_model()
    wrapped = tc.prune_model(model, tfmot.sparsity.keras.ConstantSparsity(0.0, 0))
    names = sorted(w.layer.name for w in wrappers(wrapped))
    assert names == ["conv_a", "conv_b"]  # the 1x1 conv is skipped
    np.testing.assert_array_equal(wrapped(data[0]), model(data[0]))


@pytest.mark.parametrize(
    "schedule_factory",
    [
        lambda: tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=2, end_step=10, frequency=3),
        lambda: tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=3, end_step=9, frequency=2),
    ],
    ids=["PolynomialDecay", "ConstantSparsity"],
)
def test_prunes_exactly_when_the_tfmot_schedule_says(data, schedule_factory):
    schedule = schedule_factory()
    wrapped = tc.prune_model(small_model(), schedule, transforms="d4")
    compile_fit(wrapped, data, epochs=3)  # 4 batches an epoch: steps 0..11
    expected_steps = [s for s in range(12) if bool(schedule(s)[0])]
    last_sparsity = float(schedule(expected_steps[-1])[1])
    for wrapper in wrappers(wrapped):
        steps = [h["step"] for h in wrapper.pruning_history]
        assert steps == expected_steps
        assert int(np.asarray(wrapper.pruning_step)) == 11
        assert wrapper.sparsity == 1 - pruning.kept_filters(16, last_sparsity) / 16


def test_sparsity_never_decreases_and_replaced_filters_stay_replaced():
    schedule = lambda step: (True, [0.5, 0.25, 0.75, 0.6][step])  # noqa: E731
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(8, 3, name="c")])
    wrapped = tc.prune_model(model, schedule, transforms="rotations")
    wrapper = wrappers(wrapped)[0]
    masks = []
    for step in range(4):
        tc.update_pruning_step(wrapped, step)
        masks.append(np.asarray(wrapper.reconstructed).copy())
    assert [int(m.sum()) for m in masks] == [4, 4, 6, 6]
    for before, after in zip(masks, masks[1:]):
        assert not (before & ~after).any(), "a replaced filter came back"


def test_gradients_reach_bases_through_reconstructed_filters():
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((7, 7, 4)), keras.layers.Conv2D(8, 3, name="c")])
    wrapped = tc.prune_model(model, lambda step: (True, 0.75), transforms="d4", depth_groups=2)
    tc.update_pruning_step(wrapped, 0)
    wrapper = wrappers(wrapped)[0]
    wrapper.filter_scale.assign(rng.normal(size=8).astype("float32"))
    stripped = tc.strip_model(wrapped)
    x = tf.constant(rng.normal(size=(2, 7, 7, 4)).astype("float32"))
    upstream = rng.normal(size=(2, 5, 5, 8)).astype("float32")

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapped(x) * upstream)
    g_kernel, g_scale = tape.gradient(loss, [wrapper.layer.kernel, wrapper.filter_scale])
    layer = stripped.layers[0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(stripped(x) * upstream)
    g_base, g_scale_stripped = tape.gradient(loss, [layer.base_kernel, layer.scale_weight])

    kept = wrapper.kept
    assert len(kept) == 2
    replaced = np.setdiff1d(np.arange(8), kept)
    assert_close(np.asarray(g_kernel)[..., kept], g_base, 1e-5)
    assert not np.asarray(g_kernel)[..., replaced].any(), "replaced filters' own weights got gradient"
    assert_close(np.asarray(g_scale)[replaced], np.asarray(g_scale_stripped)[replaced], 1e-5)


@pytest.mark.parametrize("depth_groups, scale", [(1, True), (2, True), (1, False)])
def test_strip_keeps_outputs_and_parameter_count(data, depth_groups, scale):
    wrapped = tc.prune_model(
        small_model(), tfmot.sparsity.keras.ConstantSparsity(0.75, 0, frequency=1),
        transforms="d4", depth_groups=depth_groups, scale=scale,
    )
    compile_fit(wrapped, data, epochs=1)
    stripped = tc.strip_model(wrapped)
    assert_close(stripped(data[0]), wrapped(data[0]), 1e-5)
    for name in ("conv_a", "conv_b"):
        layer = stripped.get_layer(name)
        assert isinstance(layer, TransformConv2D)
        assert layer.base_filters == 4
        c_in = layer.base_kernel.shape[2]
        assert layer.count_params() == cost.parameter_formula(3, c_in, 16, 4, scale, True)


@pytest.mark.parametrize("family", ["scalar", "rotation", "affine", "general"])
def test_learned_family_starts_at_its_least_squares_fit(data, family, tmp_path):
    """At the pruning step, each reconstructed filter is its least-squares fit;
    training then moves the operators; strip and .keras keep the outputs."""
    model = keras.Sequential([keras.Input((7, 7, 4)), keras.layers.Conv2D(8, 3, name="c")])
    kernel = np.asarray(model.layers[0].kernel)
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=100)
    wrapped = tc.prune_model(model, schedule, transforms="d4", transform_family=family)
    tc.update_pruning_step(wrapped, 0)
    wrapper = wrappers(wrapped)[0]
    fit = tc.assignment.fit_assignment(kernel, 4, "d4", transform_family=family)
    assert_close(wrapper.effective_kernel(), fit.reconstruct(), 1e-5)
    replaced = np.asarray(wrapper.reconstructed)
    np.testing.assert_allclose(
        np.asarray(wrapper.transform_params)[:, replaced], fit.transform_params[:, replaced],
        rtol=1e-6, atol=1e-6,
    )
    x = data[0][:8, :7, :7]
    y = np.random.default_rng(0).normal(size=(8, 5, 5, 8)).astype("float32")
    wrapped.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = np.asarray(wrapper.transform_params).copy()
    wrapped.fit(x, y, epochs=2, verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
    moved = np.abs(np.asarray(wrapper.transform_params) - before)[:, replaced]
    assert moved.max() > 0, "the operators of reconstructed filters did not train"
    stripped = tc.strip_model(wrapped)
    layer = stripped.layers[0]
    assert layer.transform_family == family and layer.num_transformed == 4
    assert_close(stripped(x), wrapped(x), 1e-5)
    wrapped.save(tmp_path / "wrapped.keras")
    loaded = keras.saving.load_model(tmp_path / "wrapped.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(x), wrapped(x), rtol=1e-6, atol=1e-6)


def test_wrapped_and_stripped_models_save_and_load_safely(tmp_path, data):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    wrapped = tc.prune_model(small_model(), schedule, transforms="rotations")
    compile_fit(wrapped, data, epochs=1)
    wrapped.save(tmp_path / "wrapped.keras")
    loaded = keras.saving.load_model(tmp_path / "wrapped.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(data[0]), wrapped(data[0]), rtol=1e-6, atol=1e-6)
    restored = wrappers(loaded)[0]
    assert type(restored.schedule).__name__ == "PolynomialDecay"
    assert restored.schedule.get_config() == schedule.get_config()
    assert int(np.asarray(restored.pruning_step)) == 3
    np.testing.assert_array_equal(restored.reconstructed, wrappers(wrapped)[0].reconstructed)

    stripped = tc.strip_model(wrapped)
    stripped.save(tmp_path / "stripped.keras")
    loaded = keras.saving.load_model(tmp_path / "stripped.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(data[0]), stripped(data[0]))
    assert (tmp_path / "stripped.keras").stat().st_size < (tmp_path / "wrapped.keras").stat().st_size


def test_resumed_training_continues_the_step(data, tmp_path):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=7, frequency=2)
    wrapped = tc.prune_model(small_model(), schedule)
    compile_fit(wrapped, data, epochs=1)  # steps 0..3
    wrapped.save(tmp_path / "w.keras")
    resumed = keras.saving.load_model(tmp_path / "w.keras", safe_mode=True)
    compile_fit(resumed, data, epochs=1)  # steps 4..7
    wrapper = wrappers(resumed)[0]
    assert [h["step"] for h in wrapper.pruning_history] == [4, 6]
    assert wrapper.sparsity == 1 - pruning.kept_filters(16, 0.75) / 16


def test_summaries_callback_writes_tensorboard_events(data, tmp_path):
    wrapped = tc.prune_model(small_model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=2))
    compile_fit(wrapped, data, callbacks=[
        tc.UpdateTransformPruningStep(), tc.TransformPruningSummaries(str(tmp_path))
    ])
    events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert events
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            tags.add(value.tag)
    assert "transform_pruning_conv_a/sparsity" in tags
    assert "transform_pruning_conv_b/reconstruction_error" in tags


# ----------------------------------------------------------------------------
# Clear errors


def test_training_without_the_step_callback_fails(data):
    wrapped = tc.prune_model(small_model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    with pytest.raises(ValueError, match="without its pruning step callback.*UpdateTransformPruningStep"):
        compile_fit(wrapped, data, callbacks=[])


def test_schedule_sparsity_out_of_range(data):
    wrapped = tc.prune_model(small_model(), lambda step: (True, 1.0))
    with pytest.raises(ValueError, match=r"sparsity=1.0 at step 0; expected a value in \[0, 1\)"):
        compile_fit(wrapped, data)


def test_subclassed_model_is_rejected_with_candidates():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, name="inner_conv")

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 5, 5, 2), "float32"))
    with pytest.raises(ValueError, match=r"subclassed model.*TransformPruning\(layer, schedule\).*'inner_conv'"):
        tc.prune_model(net, lambda step: (True, 0.5))


def test_unknown_layer_name_lists_eligible_layers():
    with pytest.raises(ValueError, match=r"No eligible layer is named \['conv_z'\].*'conv_a', 'conv_b'"):
        tc.prune_model(small_model(), lambda step: (True, 0.5), layers=["conv_z"])


def test_layer_selection_by_type_and_predicate():
    model = small_model()
    by_pred = tc.prune_model(model, lambda s: (False, 0.0), layers=lambda l: l.name == "conv_b")
    assert [w.layer.name for w in wrappers(by_pred)] == ["conv_b"]
    by_type = tc.prune_model(model, lambda s: (False, 0.0), layers=keras.layers.Conv2D)
    assert len(wrappers(by_type)) == 2


def test_unsaveable_schedule_says_how_to_fix(tmp_path):
    wrapped = tc.prune_model(small_model(), lambda step: (False, 0.0))
    with pytest.raises(ValueError, match="cannot be saved.*register_keras_serializable"):
        wrapped.save(tmp_path / "m.keras")


@keras.saving.register_keras_serializable(package="tests")
class StepSparsity:
    """A user schedule: prune to `sparsity` at `step` exactly."""

    def __init__(self, step, sparsity):
        self.step, self.sparsity = step, sparsity

    def __call__(self, step):
        return step == self.step, self.sparsity

    def get_config(self):
        return {"step": self.step, "sparsity": self.sparsity}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def test_registered_user_schedule_round_trips(tmp_path, data):
    wrapped = tc.prune_model(small_model(), StepSparsity(1, 0.5))
    compile_fit(wrapped, data)
    assert [w.sparsity for w in wrappers(wrapped)] == [0.5, 0.5]
    wrapped.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    schedule = wrappers(loaded)[0].schedule
    assert isinstance(schedule, StepSparsity) and schedule.get_config() == {"step": 1, "sparsity": 0.5}


def test_wrapper_rejects_what_it_cannot_rebuild():
    with pytest.raises(ValueError, match=r"cannot wrap DepthwiseConv2D 'dw': depthwise"):
        pruning.TransformPruning(keras.layers.DepthwiseConv2D(3, name="dw"), lambda s: (False, 0.0))
    with pytest.raises(ValueError, match=r"'pw': 1x1 kernel"):
        pruning.TransformPruning(keras.layers.Conv2D(4, 1, name="pw"), lambda s: (False, 0.0))
    with pytest.raises(ValueError, match=r"criterion.*'reconstruction', 'l1'.*'random'"):
        pruning.TransformPruning(keras.layers.Conv2D(4, 3), lambda s: (False, 0.0), criterion="random")
