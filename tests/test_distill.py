"""Inner knowledge distillation: the loss against numpy, a frozen teacher, projections."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest

from tf_transform_conv.distill import InnerDistiller
from tf_transform_conv.distill import last_feature_map


def net(width, seed, name):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(width, 3, name="features")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x), name=name)


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 4, n)


def numpy_loss(distiller, student, teacher, x, y, layers, weight, output_weight, t):
    """The distiller's loss, from the models' outputs and numpy."""
    def outputs(model, names):
        probe = keras.Model(model.input, [model.output] + [model.get_layer(n).output
                                                            for n in names])
        return [np.asarray(o, "float64") for o in probe(x, training=False)]

    s = outputs(student, [a for a, _ in layers])
    tt = outputs(teacher, [b for _, b in layers])
    logits = s[0]
    log_p = logits - logits.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    task = -np.mean(log_p[np.arange(len(y)), y])
    inner = []
    for projection, fs, ft in zip(distiller.projections, s[1:], tt[1:]):
        if projection is not None:
            kernel = np.asarray(projection.kernel, "float64")
            fs = fs @ kernel.reshape(kernel.shape[-2], kernel.shape[-1])
        inner.append(np.mean((fs - ft) ** 2))
    p_t = np.exp(tt[0] / t) / np.exp(tt[0] / t).sum(1, keepdims=True)
    z = logits / t
    log_s = z - z.max(1, keepdims=True)
    log_s = log_s - np.log(np.exp(log_s).sum(1, keepdims=True))
    kd = t * t * np.mean(np.sum(p_t * (np.log(p_t) - log_s), axis=1))
    return (1 - output_weight) * task + output_weight * kd + weight * np.mean(inner)


@pytest.mark.parametrize("output_weight", [0.0, 0.6])
def test_loss_matches_numpy(output_weight):
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    layers = [("features", "features"), ("pooled", "pooled")]
    distiller = InnerDistiller(student, teacher, layers, weight=0.7,
                               output_weight=output_weight, temperature=3.0)
    distiller.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    got = distiller.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected = numpy_loss(distiller, student, teacher, x, y, layers, 0.7, output_weight, 3.0)
    # float32 against float64: relative 1e-5.
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert [p is not None for p in distiller.projections] == [True, True]


@pytest.mark.parametrize("jit_compile", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_training_matches_features_and_freezes_the_teacher(jit_compile):
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    distiller = InnerDistiller(student, teacher, ["features"], weight=10.0)
    distiller.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
    x, y = data(32)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    history = distiller.fit(x, y, batch_size=8, epochs=6, verbose=0)
    inner = history.history["inner_kd_loss"]
    assert inner[-1] < 0.5 * inner[0], inner
    for w, w0 in zip(teacher.get_weights(), teacher_weights):
        np.testing.assert_array_equal(w, w0)
    np.testing.assert_allclose(distiller(x), student(x), rtol=1e-6)


def test_equal_widths_need_no_projection():
    distiller = InnerDistiller(net(8, 0, "student"), net(8, 1, "teacher"), ["features"])
    assert distiller.projections == [None]
    again = InnerDistiller.from_config(distiller.get_config())
    assert again.layer_pairs == [("features", "features")]


def test_bad_arguments():
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    with pytest.raises(ValueError, match="has no layer named 'nope'"):
        InnerDistiller(student, teacher, ["nope"])
    with pytest.raises(ValueError, match="same shape apart from the channels"):
        InnerDistiller(student, teacher, [("features", "pooled")])
    with pytest.raises(ValueError, match="output_weight"):
        InnerDistiller(student, teacher, ["features"], output_weight=1.5)
    with pytest.raises(ValueError, match="non-empty list"):
        InnerDistiller(student, teacher, "features")
    # A teacher that is the student, or shares its layers, would freeze it.
    with pytest.raises(ValueError, match="`teacher`: it is the student itself"):
        InnerDistiller(student, student, ["features"])
    inputs = keras.Input((8, 8, 3))
    shared = keras.Model(inputs, student.get_layer("logits")(
        keras.layers.GlobalAveragePooling2D()(student.get_layer("features")(inputs))))
    with pytest.raises(ValueError, match="shares 4 weights with the student"):
        InnerDistiller(student, shared, ["features"])
    assert student.trainable and student.get_layer("features").trainable


# ----------------------------------------------------------------------------
# On keras.distillation: the terms, and what InnerDistiller overrides


def compiled(distiller, jit_compile=False, **kwargs):
    distiller.compile(kwargs.pop("optimizer", "sgd"),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile, **kwargs)
    return distiller


def numpy_kd(teacher_logits, student_logits, t):
    """`T^2 * mean KL(softmax(t/T) || softmax(s/T))`, in float64, from the logits."""
    def log_softmax(z):
        z = np.asarray(z, "float64") / t
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    log_t, log_s = log_softmax(teacher_logits), log_softmax(student_logits)
    return t * t * np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=1))


def test_is_a_keras_distiller_of_logits_and_feature_terms():
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    distiller = InnerDistiller(student, teacher, ["features", "pooled"], weight=0.6,
                               output_weight=0.3, temperature=2.0)
    assert isinstance(distiller, keras.distillation.Distiller)
    logits, *inner = distiller.distillation_losses
    assert isinstance(logits, keras.distillation.LogitsDistillation)
    # Passed explicitly: the default string "kl_divergence" skips the softmax and the T^2.
    assert isinstance(logits.loss, keras.losses.KLDivergence) and logits.temperature == 2.0
    assert all(isinstance(term, keras.distillation.FeatureDistillation) for term in inner)
    assert [(t.student_layer_name, t.teacher_layer_name) for t in inner] == \
        [("features", "features"), ("pooled", "pooled")]
    assert distiller.distillation_loss_weights == pytest.approx([0.3, 0.3, 0.3])
    assert distiller.student is student and distiller.teacher is teacher
    assert not teacher.trainable


def test_keras_default_logits_loss_is_not_the_distillation_kl():
    """Keras 3.15.1: `LogitsDistillation()`'s default string loss misses its own KL branch.

    It resolves "kl_divergence" to the plain function and applies it to
    T-scaled logits, without softmax or T^2. If Keras fixes this, the first
    assertion fails: passing KLDivergence() explicitly is then no longer
    needed (but stays right).
    """
    rng = np.random.default_rng(0)
    t, s = (rng.normal(size=(16, 10)).astype("float32") * 3 for _ in range(2))
    reference = numpy_kd(t, s, 4.0)
    default = float(keras.distillation.LogitsDistillation(4.0).compute_loss(t, s))
    explicit = float(keras.distillation.LogitsDistillation(
        4.0, loss=keras.losses.KLDivergence()).compute_loss(t, s))
    assert abs(default - reference) > 0.5 * reference, (default, reference)
    assert explicit == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_output_term_is_the_kl_of_softened_outputs(temperature):
    """`kd_loss` and, with output_weight=1, the loss: T^2 KL(softmax(t/T) || softmax(s/T))."""
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    # Sharper teacher logits: the softmaxes differ at every temperature.
    teacher.get_layer("logits").set_weights(
        [w * 5 for w in teacher.get_layer("logits").get_weights()])
    distiller = compiled(InnerDistiller(student, teacher, [], output_weight=1.0,
                                        temperature=temperature))
    x, y = data()
    got = distiller.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected = numpy_kd(teacher(x), student(x), temperature)
    # float32 against float64: relative 1e-5.
    assert got["kd_loss"] == pytest.approx(expected, rel=1e-5)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert sorted(got) == ["kd_loss", "loss"]


def test_output_distillation_lowers_kd_loss():
    """Output distillation alone (no inner layers), as examples/train.py's --teacher runs it."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(64) % 10, 10)

    def cnn():
        return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])

    teacher = cnn()
    teacher.layers[-1].set_weights([w * 5 for w in teacher.layers[-1].get_weights()])
    distiller = InnerDistiller(cnn(), teacher, [], temperature=2.0, output_weight=1.0)
    distiller.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.CategoricalCrossentropy(from_logits=True))

    def kd():
        return float(numpy_kd(teacher(x), distiller(x), 2.0))

    before = kd()
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    history = distiller.fit(x, y, batch_size=16, epochs=5, verbose=0)
    assert kd() < 0.5 * before, (before, kd())
    for w, w0 in zip(teacher.get_weights(), teacher_weights):
        np.testing.assert_array_equal(w, w0)  # the teacher stays frozen
    # w = 1: the loss is the distillation term alone.
    assert history.history["loss"] == pytest.approx(history.history["kd_loss"], rel=1e-5)
    loss = float(distiller.compute_loss(x, y, distiller(x)))
    assert loss == pytest.approx(kd(), rel=1e-5)


@pytest.mark.parametrize("output_weight", [0.0, 0.5, 1.0])
def test_regularization_losses_count_in_full(output_weight):
    """Keras's Distiller leaves the student's regularizers out; here they are added unweighted."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="features",
                            kernel_regularizer=keras.regularizers.L2(0.5))(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    student = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    teacher = net(4, 1, "teacher")
    distiller = compiled(InnerDistiller(student, teacher, ["features"], weight=0.7,
                                        output_weight=output_weight, temperature=3.0))
    x, y = data()
    got = distiller.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    kernel = np.asarray(student.get_layer("features").kernel, "float64")
    penalty = 0.5 * np.sum(kernel ** 2)
    expected = numpy_loss(distiller, student, teacher, x, y, [("features", "features")], 0.7,
                          output_weight, 3.0) + penalty
    assert penalty > 0.1 * expected
    assert got["loss"] == pytest.approx(expected, rel=1e-5)


def test_sample_weights_weigh_the_task_term():
    """Compiled through keras.Model.compile: the task loss sees the sample weights."""
    student, teacher = net(4, 0, "student"), net(4, 1, "teacher")
    distiller = compiled(InnerDistiller(student, teacher, ["features"], weight=0.0))
    x, y = data()
    weights = np.zeros(len(x), "float32")
    weights[:2] = 1.0
    got = distiller.evaluate(x, y, sample_weight=weights, batch_size=len(x), verbose=0,
                             return_dict=True)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    per_sample = np.asarray(ce(y, student(x)), "float64")
    # Keras's sum_over_batch_size: the weighted sum over the whole batch size.
    assert got["loss"] == pytest.approx(np.sum(per_sample * weights) / len(x), rel=1e-5)


def bn_net(seed, name, width=8):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(width, 3, name="features")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x), name=name)


def bn_updates(student, x, fit):
    """How many times one `fit` step moved the student's batch-norm statistics (momentum 0.5)."""
    batch_mean = np.asarray(student.get_layer("features")(x)).mean(axis=(0, 1, 2))
    fit()
    moving = np.asarray(student.get_layer("bn").moving_mean)
    return float(np.median(np.log(1 - moving / batch_mean) / np.log(0.5)))


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("output_weight", [0.0, 0.5])
def test_one_student_pass_per_step(jit_compile, output_weight):
    """Keras's Distiller runs the student again for the features: 2 batch-norm updates a step."""
    student, teacher = bn_net(0, "student", 4), bn_net(1, "teacher")
    distiller = compiled(InnerDistiller(student, teacher, ["bn"], output_weight=output_weight),
                         jit_compile=jit_compile, optimizer=keras.optimizers.SGD(0.0))
    x, y = data()
    fit = lambda: distiller.fit(x, y, batch_size=len(x), epochs=1, verbose=0)  # noqa: E731
    assert bn_updates(student, x, fit) == pytest.approx(1.0, abs=1e-3)
    # The same step through keras.distillation.Distiller, for contrast.
    student, teacher = bn_net(0, "student", 8), bn_net(1, "teacher")
    keras_distiller = keras.distillation.Distiller(
        teacher, student, keras.distillation.FeatureDistillation("mse", "bn", "bn"))
    compiled(keras_distiller, optimizer=keras.optimizers.SGD(0.0))
    fit = lambda: keras_distiller.fit(x, y, batch_size=len(x), epochs=1, verbose=0)  # noqa: E731
    assert bn_updates(student, x, fit) == pytest.approx(2.0, abs=1e-3)


def test_inner_term_without_output_distillation():
    """`task + gamma * inner` with w = 0, which Keras's s * task + (1 - s) * sum cannot express."""
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    distiller = compiled(InnerDistiller(student, teacher, ["features"], weight=2.0))
    x, y = data()
    got = distiller.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    ce = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, student(x)))
    assert got["inner_kd_loss"] > 0.01
    assert got["loss"] == pytest.approx(ce + 2.0 * got["inner_kd_loss"], rel=1e-5)
    assert "kd_loss" not in got


def test_teacher_of_other_classes():
    """Fine for inner distillation alone; a clear error at construction with output distillation."""
    student = net(4, 0, "student")
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, keras.layers.Dense(10)(x), name="teacher10")
    with pytest.raises(ValueError, match=r"output_weight.*the student 'student' outputs "
                       r"\(None, 4\) and the teacher 'teacher10' \(None, 10\)"):
        InnerDistiller(student, teacher, ["features"], output_weight=0.5)
    distiller = compiled(InnerDistiller(student, teacher, ["features"]))
    x, y = data()
    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_mixed_precision_student_of_a_float32_teacher():
    """Keras's Distiller rejects the dtypes; here the logits are compared in float32."""
    teacher = net(8, 1, "teacher")
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        student = net(4, 0, "student")
        with pytest.raises(ValueError, match="dtypes must match"):
            keras.distillation.Distiller(teacher, student,
                                         keras.distillation.LogitsDistillation())
        distiller = compiled(InnerDistiller(student, teacher, ["features"], output_weight=0.5))
        x, y = data()
        logs = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert student.outputs[0].dtype == "bfloat16"
    assert np.isfinite(logs["kd_loss"][-1]) and np.isfinite(logs["inner_kd_loss"][-1])


def test_trained_student_saves_and_reloads_in_safe_mode(tmp_path):
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    distiller = compiled(InnerDistiller(student, teacher, ["features"], output_weight=0.5))
    x, y = data()
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    distiller.student.save(tmp_path / "student.keras")
    again = keras.saving.load_model(tmp_path / "student.keras", safe_mode=True)
    np.testing.assert_allclose(again(x), student(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(distiller.predict(x, verbose=0), student(x), rtol=1e-6,
                               atol=1e-6)


def test_layers_must_name_something_to_distil():
    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    with pytest.raises(ValueError, match=r"an empty one only with output_weight > 0"):
        InnerDistiller(student, teacher, [])
    with pytest.raises(ValueError, match="temperature"):
        InnerDistiller(student, teacher, ["features"], temperature=0)
    with pytest.raises(ValueError, match="Expected a built Functional or Sequential"):
        InnerDistiller(student, "teacher.keras", ["features"])


def test_last_feature_map_is_the_input_of_pooling():
    assert last_feature_map(net(4, 0, "student")) == "relu"
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no layer with a 4D output"):
        last_feature_map(dense)


# ----------------------------------------------------------------------------
# Other backends and distribution, each in a subprocess

JAX_SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys
    import numpy as np, keras
    assert keras.backend.backend() == "jax"
    from tf_transform_conv import InnerDistiller
    sys.path.insert(0, args[1])
    from test_distill import bn_net, bn_updates, data

    out = pathlib.Path(args[0])
    x, y = data()
    results = {}
    for jit in (True, False):
        student, teacher = bn_net(0, "student", 4), bn_net(1, "teacher")
        distiller = InnerDistiller(student, teacher, ["features", "pooled"], weight=0.7,
                                   output_weight=0.4, temperature=3.0)
        distiller.compile(keras.optimizers.SGD(0.0),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=jit)
        row = {"loss": distiller.evaluate(x, y, batch_size=len(x), verbose=0,
                                          return_dict=True)["loss"]}
        folder = out / f"jit{int(jit)}"
        folder.mkdir()
        student.save(folder / "student.keras")
        teacher.save(folder / "teacher.keras")
        np.save(folder / "kernels.npy", np.asarray(
            [np.asarray(p.kernel) for p in distiller.projections], dtype=object),
            allow_pickle=True)
        fit = lambda: distiller.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
        row["bn_updates"] = bn_updates(student, x, fit)
        distiller.optimizer.learning_rate.assign(0.05)
        logs = distiller.fit(x, y, batch_size=8, epochs=4, verbose=0).history
        row["inner"] = logs["inner_kd_loss"]
        row["kd"] = logs["kd_loss"]
        row["predict_error"] = float(np.abs(distiller.predict(x, verbose=0)
                                            - np.asarray(student(x))).max())
        student.save(folder / "trained.keras")
        again = keras.saving.load_model(folder / "trained.keras", safe_mode=True)
        row["reload_error"] = float(np.abs(np.asarray(again(x)) - np.asarray(student(x))).max())
        results[str(jit)] = row
    result = results
    """
)


@pytest.mark.slow
def test_every_verb_on_jax_with_and_without_jit(tmp_path, jax_backend):
    """fit, evaluate, predict and saving on JAX, the loss against numpy (models read back here)."""
    results = jax_backend.run(JAX_SCRIPT, tmp_path, pathlib.Path(__file__).parent)
    x, y = data()
    layers = [("features", "features"), ("pooled", "pooled")]
    for jit, row in results.items():
        folder = tmp_path / f"jit{int(jit == 'True')}"
        student = keras.saving.load_model(folder / "student.keras")
        teacher = keras.saving.load_model(folder / "teacher.keras")
        kernels = np.load(folder / "kernels.npy", allow_pickle=True)
        stand_in = types.SimpleNamespace(
            projections=[types.SimpleNamespace(kernel=k) for k in kernels])
        expected = numpy_loss(stand_in, student, teacher, x, y, layers, 0.7, 0.4, 3.0)
        assert row["loss"] == pytest.approx(expected, rel=1e-5), jit
        assert row["bn_updates"] == pytest.approx(1.0, abs=1e-3), jit
        assert row["inner"][-1] < row["inner"][0] and row["kd"][-1] < row["kd"][0], row
        assert row["predict_error"] < 1e-5 and row["reload_error"] < 1e-5, row


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tf_transform_conv import InnerDistiller
    sys.path.insert(0, sys.argv[1])
    from test_distill import data, net

    x, y = data()
    results = []
    for strategy in (tf.distribute.get_strategy(),
                     tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
        with strategy.scope():
            distiller = InnerDistiller(net(4, 0, "student"), net(8, 1, "teacher"),
                                       ["features"], weight=0.7, output_weight=0.4,
                                       temperature=3.0)
            distiller.projections[0].kernel.assign(
                np.random.default_rng(2).normal(size=(1, 1, 4, 8)).astype("float32"))
            distiller.compile(keras.optimizers.SGD(0.1),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              jit_compile=False)
        logs = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
        distiller.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights = [np.asarray(w).tolist() for w in distiller.trainable_weights]
        results.append({"logs": logs, "weights": weights,
                        "replicas": strategy.num_replicas_in_sync})
    print("RESULT", json.dumps(results))
    """
)


@pytest.mark.slow
def test_same_loss_and_step_under_mirrored_strategy():
    """Every term scales alike across replicas: the loss and one SGD step equal one device's."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(pathlib.Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    single, mirrored = json.loads(completed.stdout.split("RESULT", 1)[1])
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    for name in ("loss", "kd_loss", "inner_kd_loss"):
        assert mirrored["logs"][name] == pytest.approx(single["logs"][name], rel=1e-5), name
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_distiller_saves_and_reloads_compiled(tmp_path):
    import warnings

    student, teacher = net(4, 0, "student"), net(8, 1, "teacher")
    distiller = compiled(InnerDistiller(student, teacher, ["features"], weight=0.7,
                                        output_weight=0.5))
    x, y = data()
    distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    distiller.save(tmp_path / "distiller.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = keras.saving.load_model(tmp_path / "distiller.keras")
    assert not [w for w in caught if "compile()" in str(w.message)]
    assert type(again) is InnerDistiller and again.layer_pairs == [("features", "features")]
    np.testing.assert_allclose(again.projections[0].kernel, distiller.projections[0].kernel)
    expected = distiller.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    got = again.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    assert got == pytest.approx(expected, rel=1e-5)


def test_the_recommended_route_distilled_from_the_dense_model():
    """The recipe the README recommends: the student wrapped by `prune_model` with
    `Reconstruction.recommended()`, trained inside an output-only `InnerDistiller`
    with the pruning callback, then stripped (JAX: tests/test_jax_backend.py)."""
    import tf_transform_conv as tc
    from tf_transform_conv.sparsity import PolynomialDecay

    x, y = data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher = net(8, 1, "teacher")
    teacher.compile("adam", loss)
    teacher.fit(x, y, verbose=0)
    schedule = PolynomialDecay(0.0, 0.75, 0, 4, frequency=2)
    student = tc.prune_model(net(8, 0, "student"), schedule, tc.Reconstruction.recommended())
    distiller = InnerDistiller(student, teacher, layers=[], output_weight=0.9, temperature=4.0)
    learning_rate = tc.training.CosineRestart(1e-3, 8, restart_step=schedule.end_step)
    distiller.compile(keras.optimizers.Adam(learning_rate), loss)
    before = [np.asarray(w) for w in teacher.weights]
    rates = []
    history = distiller.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
        tc.UpdateTransformPruningStep(), keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda batch, logs: rates.append(
                float(distiller.optimizer.learning_rate)))])
    stripped = tc.strip_model(student)
    (layer,) = [l for l in stripped.layers if isinstance(l, tc.TransformConv2D)]
    assert sorted(history.history) == ["kd_loss", "loss"]
    # The rate of each of the 8 steps: a cosine over 8 cut at the pruning's end
    # (step 4), then one over the last 4 from the peak again.
    cosine = [0.5e-3 * (1 + np.cos(np.pi * t / 8)) for t in range(4)]
    np.testing.assert_allclose(rates, cosine + [0.5e-3 * (1 + np.cos(np.pi * t / 4))
                                                for t in range(4)], rtol=1e-5)
    assert (layer.filters, layer.base_filters, layer.transform_family) == (8, 2, "affine")
    np.testing.assert_allclose(stripped(x), student(x), rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, teacher.weights))
