"""Inner knowledge distillation: the loss against numpy, a frozen teacher, projections."""

import keras
import numpy as np
import pytest

from tf_transform_conv.distill import InnerDistiller


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
