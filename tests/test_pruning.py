"""Generalised pruning: the wrapper, the callbacks, tfmot schedules, strip_model."""

import glob
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tf_transform_conv as tc
from tf_transform_conv import cost
from tf_transform_conv import pruning
from tf_transform_conv import TransformConv2D
from tf_transform_conv.ops.assignment import fit_assignment
from tf_transform_conv.ops.assignment import kept_filters


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
    assert kept_filters(16, 0.75) == 4
    assert kept_filters(10, 0.25) == 7  # 2.5 rounds half up to 3 replaced
    assert kept_filters(4, 0.99) == 1  # at least one base


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
    wrapped = tc.prune_model(
        small_model(), schedule, reconstruction=tc.Reconstruction(transforms="d4"))
    compile_fit(wrapped, data, epochs=3)  # 4 batches an epoch: steps 0..11
    expected_steps = [s for s in range(12) if bool(schedule(s)[0])]
    last_sparsity = float(schedule(expected_steps[-1])[1])
    for wrapper in wrappers(wrapped):
        steps = [h["step"] for h in wrapper.pruning_history]
        assert steps == expected_steps
        assert int(np.asarray(wrapper.pruning_step)) == 11
        assert wrapper.sparsity == 1 - kept_filters(16, last_sparsity) / 16


def test_sparsity_never_decreases_and_replaced_filters_stay_replaced():
    schedule = lambda step: (True, [0.5, 0.25, 0.75, 0.6][step])  # noqa: E731
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(8, 3, name="c")])
    wrapped = tc.prune_model(
        model, schedule, reconstruction=tc.Reconstruction(transforms="rotations"))
    wrapper = wrappers(wrapped)[0]
    masks = []
    for step in range(4):
        tc.update_pruning_step(wrapped, step)
        masks.append(np.asarray(wrapper.reconstructed).copy())
    assert [int(m.sum()) for m in masks] == [4, 4, 6, 6]
    for before, after in zip(masks, masks[1:]):
        assert not (before & ~after).any(), "a replaced filter came back"


def test_the_step_must_be_an_int_at_least_zero():
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(8, 3, name="c")])
    wrapped = tc.prune_model(model, lambda step: (True, 0.5))
    for step in (-1, 1.5, "3", None, True):
        with pytest.raises(ValueError, match=r"`step`. Expected an int >= 0"):
            tc.update_pruning_step(wrapped, step)
    assert wrappers(wrapped)[0].sparsity == 0.0  # nothing pruned by the refused calls
    with pytest.raises(ValueError, match=r"`scores`. Expected None or a dict"):
        tc.update_pruning_step(wrapped, 0, scores=[1.0])
    # A scalar integer tensor (an optimizer's iterations) is read as its value.
    assert tc.update_pruning_step(wrapped, keras.Variable(np.int64(2), dtype="int64")) == ["transform_pruning_c"]
    assert int(wrappers(wrapped)[0].pruning_step) == 2
    assert wrappers(wrapped)[0].sparsity == 0.5


def test_gradients_reach_bases_through_reconstructed_filters():
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((7, 7, 4)), keras.layers.Conv2D(8, 3, name="c")])
    wrapped = tc.prune_model(
        model,
        lambda step: (True, 0.75),
        reconstruction=tc.Reconstruction(transforms="d4", depth_groups=2),
    )
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
        small_model(),
        tfmot.sparsity.keras.ConstantSparsity(0.75, 0, frequency=1),
        reconstruction=tc.Reconstruction(transforms="d4", scale=scale, depth_groups=depth_groups),
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
    wrapped = tc.prune_model(
        model, schedule, reconstruction=tc.Reconstruction(transforms="d4", transform_family=family))
    tc.update_pruning_step(wrapped, 0)
    wrapper = wrappers(wrapped)[0]
    fit = fit_assignment(kernel, 4, "d4", transform_family=family)
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
    wrapped = tc.prune_model(
        small_model(), schedule, reconstruction=tc.Reconstruction(transforms="rotations"))
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


def test_strip_model_of_a_model_compiled_with_an_unregistered_loss(data):
    """The stripped model keeps its outputs; it is left uncompiled, with a warning."""
    wrapped = tc.prune_model(small_model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))

    def custom_loss(y_true, y_pred):  # not registered: its config cannot be rebuilt
        return keras.ops.mean(keras.ops.square(y_pred))

    wrapped.compile(optimizer="sgd", loss=custom_loss)
    wrapped.fit(*data, batch_size=8, epochs=1, verbose=0,
                callbacks=[tc.UpdateTransformPruningStep()])
    with pytest.warns(UserWarning, match="not compiled: its compile settings could not"):
        stripped = tc.strip_model(wrapped)
    assert not stripped.compiled and wrapped.compiled
    np.testing.assert_allclose(stripped(data[0]), wrapped(data[0]), rtol=1e-5, atol=1e-6)
    wrapped.compile(optimizer="sgd", loss="mse")
    assert tc.strip_model(wrapped).compiled  # registered settings carry over


def test_resumed_training_continues_the_step(data, tmp_path):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=7, frequency=2)
    wrapped = tc.prune_model(small_model(), schedule)
    compile_fit(wrapped, data, epochs=1)  # steps 0..3
    wrapped.save(tmp_path / "w.keras")
    resumed = keras.saving.load_model(tmp_path / "w.keras", safe_mode=True)
    compile_fit(resumed, data, epochs=1)  # steps 4..7
    wrapper = wrappers(resumed)[0]
    assert [h["step"] for h in wrapper.pruning_history] == [4, 6]
    assert wrapper.sparsity == 1 - kept_filters(16, 0.75) / 16


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


@pytest.mark.parametrize("verb", ["prune_model", "prune_low_magnitude", "prune_interspace"])
def test_training_without_the_step_callback_fails_and_the_advice_works(data, verb):
    """The fix the message gives, as written, works without recompiling (TensorFlow; the
    JAX backend's in test_jax_backend.py)."""
    wrapped = getattr(tc, verb)(small_model(), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    with pytest.raises(ValueError, match="without its pruning step callback.*UpdateTransformPruningStep"):
        compile_fit(wrapped, data, callbacks=[])
    wrapped.fit(*data, batch_size=4, verbose=0, callbacks=[tc.UpdateTransformPruningStep()])
    assert all(abs(w.sparsity - 0.5) <= 0.07 for w in wrapped.layers
               if isinstance(w, tc.pruning.PruningWrapper))


@pytest.mark.parametrize("verb", ["prune_model", "prune_low_magnitude", "prune_interspace"])
def test_wrapping_a_frozen_model_warns_once_naming_its_layers(data, verb):
    """A teacher frozen by keras.distillation.Distiller, cloned, would be pruned untrained."""
    teacher = small_model()
    keras.distillation.Distiller(teacher=teacher, student=small_model(1),
                                 distillation_losses=keras.distillation.LogitsDistillation())
    assert not teacher.trainable  # what Keras's Distiller does to the user's model
    frozen = keras.models.clone_model(teacher)
    with pytest.warns(tc.pruning.FrozenLayerWarning) as caught:
        wrapped = getattr(tc, verb)(frozen, lambda step: (True, 0.5))
    assert len(caught) == 1 and caught[0].filename == __file__
    assert f"{verb}: 'conv_a', 'conv_b'" in str(caught[0].message)
    assert "Set `layer.trainable = True` on each" in str(caught[0].message)
    # What the warning is about: the schedule prunes, the kept weights never train.
    before = [w.numpy().copy() for w in wrapped.weights if "kernel" in w.path]
    compile_fit(wrapped, data)
    after = [w.numpy() for w in wrapped.weights if "kernel" in w.path]
    assert all(np.all((a == b) | (a == 0)) for a, b in zip(after, before))
    # The advice works: no warning, and the kernels train.
    assert frozen.trainable  # why `frozen.trainable = True` would change nothing here
    for layer in frozen.layers:
        layer.trainable = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", tc.pruning.FrozenLayerWarning)
        wrapped = getattr(tc, verb)(frozen, lambda step: (True, 0.5))
    before = [w.numpy().copy() for w in wrapped.weights if "kernel" in w.path]
    compile_fit(wrapped, data)
    after = [w.numpy() for w in wrapped.weights if "kernel" in w.path]
    assert any(np.any((a != b) & (a != 0)) for a, b in zip(after, before))


def test_a_wrapper_of_a_frozen_layer_warns_at_the_callers_line():
    conv = keras.layers.Conv2D(4, 3, name="frozen_conv", trainable=False)
    with pytest.warns(tc.pruning.FrozenLayerWarning, match="MagnitudePruning: 'frozen_conv'") as caught:
        tc.MagnitudePruning(conv, lambda step: (True, 0.5))
    assert caught[0].filename == __file__


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


def never(step):
    """A schedule function that never prunes."""
    return False, 0.0


@keras.saving.register_keras_serializable(package="tests")
def halve_at_step_one(step):
    return step == 1, 0.5


def test_a_schedule_function_is_saved_by_name_and_found_when_loading(tmp_path):
    """Saving never fails on a schedule (Keras truncates the file before it serialises the
    model): a function is saved by name and passed back in `custom_objects`."""
    wrapped = tc.prune_model(small_model(), never)
    path = tmp_path / "m.keras"
    path.write_bytes(b"an earlier model")
    with pytest.warns(UserWarning, match=r"saved by its name, 'never'.*custom_objects=\{'never'"):
        wrapped.save(path)
    with pytest.raises(ValueError, match=r"'never' was saved by its name.*"
                                         r"custom_objects=\{'never': schedule\}"):
        keras.saving.load_model(path, safe_mode=True)
    loaded = keras.saving.load_model(path, safe_mode=True, custom_objects={"never": never})
    assert all(w.schedule is never for w in wrappers(loaded))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    assert_close(loaded(x), wrapped(x), 1e-6)


def test_a_registered_schedule_function_loads_by_itself(tmp_path):
    wrapped = tc.prune_model(small_model(), halve_at_step_one)
    wrapped.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert all(w.schedule is halve_at_step_one for w in wrappers(loaded))


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
        pruning.TransformPruning(
            keras.layers.Conv2D(4, 3),
            lambda s: (False, 0.0),
            reconstruction=tc.Reconstruction(criterion="random"),
        )


# ----------------------------------------------------------------------------
# Arguments checked before anything is wrapped


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(transforms="bogus"), r"Unknown transform 'bogus'\. Valid transform names are .*'rot90'.*valid presets are .*'d4'"),
        (dict(transforms=["rot90", "rot180"]), r"must include 'identity'"),
        (dict(criterion="random"), r"`criterion`\. Expected one of \['reconstruction', 'l1', 'magnitude', 'taylor'\]\. Received criterion='random'"),
        (dict(depth_groups=0), r"`depth_groups`\. Expected a strictly positive int\. Received depth_groups=0\."),
        (dict(depth_groups=True), r"`depth_groups`\. Expected a strictly positive int\. Received depth_groups=True\."),
        (dict(depth_groups=2.0), r"Received depth_groups=2\.0\."),
        (dict(scale="yes"), r"`scale`\. Expected True or False\. Received scale='yes'\."),
        (dict(transform_family="spin"), r"`transform_family`\. Expected one of .*'scalar'.*Received transform_family='spin'"),
        (dict(min_bases=True), r"`min_bases`\. Expected an int >= 1\. Received min_bases=True\."),
        (dict(layers=5), r"`layers`\. Expected None .* a layer name or a list of names, a layer class .* or a predicate .*Received layers=5\."),
        (dict(layers=["conv_a", 3]), r"Received layers=\['conv_a', 3\]\."),
    ],
)
def test_prune_model_checks_every_argument_before_wrapping(kwargs, message):
    """The reconstruction settings are checked where the `Reconstruction` is made."""
    layers = kwargs.pop("layers", None)
    with pytest.raises(ValueError, match=message):
        tc.prune_model(small_model(), lambda step: (True, 0.5), tc.Reconstruction(**kwargs),
                       layers=layers)


def test_prune_model_takes_a_reconstruction_or_none():
    with pytest.raises(ValueError, match=r"`reconstruction`\. Expected a "
                                         r"tf_transform_conv\.Reconstruction .*Received "
                                         r"reconstruction='d4'"):
        tc.prune_model(small_model(), lambda step: (True, 0.5), "d4")
    wrapped = tc.prune_model(small_model(), lambda step: (True, 0.5))
    assert all(w.reconstruction == tc.Reconstruction() for w in wrappers(wrapped))


def test_prune_model_that_would_wrap_nothing_says_why():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    x = keras.layers.Conv2D(8, 1, name="pw")(x)
    x = keras.layers.Conv2D(8, 3, groups=2, name="grouped")(x)
    model = keras.Model(inputs, x)
    with pytest.raises(ValueError, match=r"wrapped no layer.*'dw': 'depthwise.*'pw': '1x1 kernel.*'grouped': 'grouped"):
        tc.prune_model(model, lambda step: (True, 0.5))
    with pytest.raises(ValueError, match=r"It has no Conv2D layer"):
        tc.prune_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), lambda step: (True, 0.5))
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0)  # a wrapped model is cloned by its config
    wrapped = tc.prune_model(small_model(), schedule)
    already = r"'conv_a': 'already wrapped by TransformPruning'.*'pointwise': '1x1 kernel"
    with pytest.raises(ValueError, match=r"prune_model wrapped no layer.*" + already):
        tc.prune_model(wrapped, schedule)
    # transform_model of it: the same error, where it returned (model, []) without a word.
    with pytest.raises(ValueError, match=r"transform_model converted no layer.*" + already):
        tc.transform_model(wrapped, sparsity=0.5)
    with pytest.raises(ValueError, match=r"'conv_a': 'not chosen by `layers`'"):
        tc.prune_model(small_model(), lambda step: (True, 0.5), layers=lambda layer: False)
    with pytest.raises(ValueError, match=r"transform_model converted no layer.*'grouped': 'grouped"):
        tc.transform_model(model, sparsity=0.5)
    # A name of a layer that cannot be chosen says why.
    with pytest.raises(ValueError, match=r"No eligible layer is named \['grouped', 'zz'\] \('grouped': "
                       r"grouped convolution \(groups=2\): not supported; 'zz': no layer of model"):
        tc.prune_model(model, lambda step: (True, 0.5), layers=["grouped", "zz"])
    with pytest.raises(ValueError, match=r"'conv_a': already wrapped by TransformPruning\)"):
        tc.transform_model(wrapped, sparsity=0.5, layers=["conv_a"])


def test_prune_model_says_which_convolutions_its_transforms_leave():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="square")(inputs)
    x = keras.layers.Conv2D(8, (3, 5), padding="same", name="wide")(x)
    x = keras.layers.Conv2D(8, 1, name="pointwise")(x)  # never eligible: no warning for it
    model = keras.Model(inputs, x)
    with pytest.warns(UserWarning, match=r"prune_model leaves 'wide' \(kernel \(3, 5\): .*\) dense: "
                      r"transforms=\[.*\] do not apply to its kernel") as caught:
        wrapped = tc.prune_model(model, lambda step: (True, 0.5))
    assert [w.filename for w in caught] == [__file__]
    assert [w.layer.name for w in wrappers(wrapped)] == ["square"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transforms that apply to every kernel: quiet
        mirrored = tc.prune_model(model, lambda step: (True, 0.5),
                                  tc.Reconstruction(transforms="flips"))
        tc.prune_model(model, lambda step: (True, 0.5), layers=["square"])
    assert [w.layer.name for w in wrappers(mirrored)] == ["square", "wide"]


# ----------------------------------------------------------------------------
# Schedules: callables, checked at their first evaluation


class MethodOnlySchedule:
    """What the README once suggested: a `schedule` method, not callable."""

    def schedule(self, step):
        return True, 0.5


def test_schedule_that_is_not_callable_says_what_is_expected():
    with pytest.raises(ValueError, match=(
            r"`schedule`\. Expected a callable schedule\(step\) -> \(should_prune, sparsity\).*"
            r"__call__\(self, step\).*MethodOnlySchedule has a `schedule` method but no `__call__`")):
        tc.prune_model(small_model(), MethodOnlySchedule())
    with pytest.raises(ValueError, match=r"Expected a callable.*Received schedule=0\.5\.$"):
        pruning.TransformPruning(keras.layers.Conv2D(4, 3), 0.5)


def test_tfmot_pruning_schedule_subclass_is_a_schedule(data):
    """tfmot users write schedules as PruningSchedule subclasses: callables returning tensors."""

    class PruneOnceAt(tfmot.sparsity.keras.PruningSchedule):
        def __init__(self, step, sparsity):
            self.step, self.sparsity = step, sparsity

        def __call__(self, step):
            return tf.equal(step, self.step), tf.constant(self.sparsity, tf.float32)

        def get_config(self):
            return {"class_name": "PruneOnceAt", "config": {"step": self.step, "sparsity": self.sparsity}}

    wrapped = tc.prune_model(small_model(), PruneOnceAt(2, 0.75))
    compile_fit(wrapped, data)  # steps 0..3
    for wrapper in wrappers(wrapped):
        assert [h["step"] for h in wrapper.pruning_history] == [2]
        assert len(wrapper.kept) == kept_filters(16, 0.75) == 4


@pytest.mark.parametrize(
    "returned, shown",
    [(0.5, r"0\.5"), ((0.5,), r"\(0\.5,\)"), ((1, 0.5), r"\(1, 0\.5\)"), ((True, "0.5"), r"\(True, '0\.5'\)"),
     ((True, 0.5, 2), r"\(True, 0\.5, 2\)"), (None, "None")],
    ids=["float", "one", "int_flag", "string_sparsity", "triple", "none"],
)
def test_schedule_returning_something_else_is_a_clear_error_at_the_first_step(data, returned, shown):
    wrapped = tc.prune_model(small_model(), lambda step: returned)
    expected = (rf"returned {shown} at step 0; expected a pair "
                r"\(should_prune: bool, sparsity: float in \[0, 1\)\)")
    with pytest.raises(ValueError, match=expected):
        tc.update_pruning_step(wrapped, 0)
    with pytest.raises(ValueError, match=expected):
        compile_fit(wrapped, data)


# ----------------------------------------------------------------------------
# depth_groups per layer; stripping what strip_model cannot rewrite


def rgb_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same", name="stem"),
        keras.layers.Conv2D(8, 3, padding="same", name="body"),
    ])


def test_depth_groups_that_do_not_divide_the_stem_give_it_one_group():
    model = rgb_model()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    wrapped = tc.prune_model(
        model, lambda step: (True, 0.5), reconstruction=tc.Reconstruction(depth_groups=2))
    groups = {w.layer.name: w.depth_groups for w in wrappers(wrapped)}
    assert groups == {"stem": 1, "body": 2}
    tc.update_pruning_step(wrapped, 0)
    stripped = tc.strip_model(wrapped)
    assert [stripped.get_layer(n).depth_groups for n in ("stem", "body")] == [1, 2]
    assert_close(stripped(x), wrapped(x), 1e-5)


def test_a_wrapper_whose_depth_groups_do_not_divide_its_channels_names_the_layer():
    conv = keras.layers.Conv2D(8, 3, name="rgb_stem")
    wrapper = pruning.TransformPruning(
        conv, lambda step: (True, 0.5), reconstruction=tc.Reconstruction(depth_groups=2))
    with pytest.raises(ValueError, match=r"input channels \(3\) of layer 'rgb_stem' must be divisible by depth_groups=2"):
        wrapper(np.zeros((1, 8, 8, 3), "float32"))


def test_strip_model_of_a_subclassed_model_says_how_and_the_advice_works():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = pruning.TransformPruning(
                keras.layers.Conv2D(8, 3, padding="same", name="c"),
                lambda step: (True, 0.5),
                reconstruction=tc.Reconstruction(transforms="d4", depth_groups=2),
            )

        def call(self, x):
            return self.conv(x)

    net = Net()
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype("float32")
    net(x)
    tc.update_pruning_step(net, 0)
    with pytest.raises(ValueError, match=(
            r"strip_model rewrites Sequential and Functional models; Net is a subclassed model\. "
            r"To strip the wrappers .* `layer, weights = wrapper\.strip\(\)`.*"
            r"`layer\.set_weights\(weights\)`\. Wrappers here: \['transform_pruning_c'\]")):
        tc.strip_model(net)
    # What the message and strip's docstring say to do:
    layer, weights = net.conv.strip()
    assert isinstance(layer, TransformConv2D) and not layer.built and layer.name == "c"
    layer.build(x.shape)
    layer.set_weights(weights)
    assert layer.base_filters == 4
    assert_close(layer(x), net(x), 1e-5)


# ----------------------------------------------------------------------------
# One protocol: a user's own wrapper is treated as the package's are


@keras.saving.register_keras_serializable(package="tests")
class HalveOutputs(pruning.PruningWrapper):
    """A toy wrapper: at each pruning step it zeroes the first `sparsity` share of the
    output channels of a `Dense`; stripped, a `Dense` with those columns zero."""

    def build(self, input_shape):
        super().build(input_shape)
        self.kept_columns = self.add_weight(name="kept", shape=(self.layer.units,),
                                            initializer="ones", trainable=False)

    def call(self, inputs, training=None):
        self.check_step_callback(training)
        return self.layer(inputs) * self.kept_columns

    @property
    def sparsity(self):
        return float(np.mean(np.asarray(self.kept_columns) == 0))

    def prune_to(self, sparsity=None, step=None, scores=None, count=None):
        columns = np.ones(self.layer.units, "float32")
        columns[: int(round(sparsity * self.layer.units))] = 0.0
        self.kept_columns.assign(columns)
        self.pruning_history.append({"step": step, "sparsity": sparsity})

    def after_step(self):
        self.after_steps = getattr(self, "after_steps", 0) + 1

    def strip(self):
        kernel, bias = (np.asarray(w) for w in self.layer.get_weights())
        columns = np.asarray(self.kept_columns)
        layer = keras.layers.Dense.from_config(self.layer.get_config())
        return layer, [kernel * columns, bias * columns]


def test_a_users_wrapper_is_driven_summarised_stripped_and_refused_by_export(tmp_path):
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1)
    dense = keras.layers.Dense(4, name="fc")
    model = keras.Sequential([keras.Input((3,)), HalveOutputs(dense, schedule, name="halve")])
    wrapper = model.layers[0]
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="trained without its pruning step callback"):
        model.fit(x, np.zeros((8, 4)), verbose=0)
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((8, 4)), batch_size=4, verbose=0, callbacks=[
        tc.UpdateTransformPruningStep(), tc.TransformPruningSummaries(str(tmp_path / "logs"))])
    assert wrapper.sparsity == 0.5 and wrapper.after_steps == 2
    assert int(np.asarray(wrapper.pruning_step)) == 1
    assert [h["step"] for h in wrapper.pruning_history] == [0, 1]
    assert glob.glob(str(tmp_path / "logs" / "*"))
    with pytest.raises(ValueError, match=r"stripped model: .*\['halve'\]"):
        tc.export_tflite(model, tmp_path / "m.tflite")
    stripped = tc.strip_model(model)
    assert type(stripped.layers[0]) is keras.layers.Dense
    assert_close(stripped(x), model(x), 1e-6)
    assert tc.model_cost(stripped).params == 16
