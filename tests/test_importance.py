"""Dependency-aware importance (numpy reference) and the self-tuning sparsity regulariser."""

import keras
import numpy as np
import pytest

from tf_transform_conv.saliency import dafp_importance
from tf_transform_conv.structured import dafp
from tf_transform_conv.structured import remove_filters


def hand_built(seed=0):
    """conv -> BN -> conv (a residual pair) -> BN -> depthwise -> BN -> GAP -> Dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    a = keras.layers.BatchNormalization(name="a_bn")(a)
    b = keras.layers.Conv2D(4, 1, name="b")(a)
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    x = keras.layers.Add()([a, b])
    x = keras.layers.Conv2D(5, 3, padding="same", name="c")(x)
    x = keras.layers.BatchNormalization(name="c_bn")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.normal(0, 1, n), rng.normal(0, 1, n), np.zeros(n), np.ones(n)])
    return model


def test_importance_matches_numpy():
    model = hand_built()
    got = dafp_importance(model)

    def weight(name):
        return model.get_layer(name).get_weights()[0]

    def gamma(name):
        return np.abs(model.get_layer(name).get_weights()[0])

    # The stream written by a and b: both scales, read by b and c.
    expected_a = (gamma("a_bn") + gamma("b_bn")) * (
        np.abs(weight("b")).mean(axis=(0, 1, 3)) + np.abs(weight("c")).mean(axis=(0, 1, 3)))
    # c's channels: two scales; read by the depthwise layer and the head.
    expected_c = (gamma("c_bn") + gamma("dw_bn")) * (
        np.abs(weight("dw")).mean(axis=(0, 1, 3)) + np.abs(weight("head")).mean(axis=1))
    assert set(got) == {"a", "c"}
    np.testing.assert_allclose(got["a"], expected_a, rtol=1e-6)
    np.testing.assert_allclose(got["c"], expected_c, rtol=1e-6)


def test_single_pair_is_the_paper_formula():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5, 5, 3))
    x = keras.layers.Conv2D(6, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="next")(x))
    model.get_layer("bn").gamma.assign(np.linspace(-1, 1, 6))
    kernel = model.get_layer("next").get_weights()[0]
    expected = np.abs(np.linspace(-1, 1, 6)) * np.abs(kernel).mean(axis=(0, 1, 3))
    np.testing.assert_allclose(dafp_importance(model)["conv"], expected, rtol=1e-6)


def test_keep_and_threshold():
    importance = {"a": np.array([1.0, 0.1, 0.5, 0.7]), "b": np.array([0.2, 0.05, 0.3])}
    assert dafp.dafp_sparsity(importance, 0.0) == 0.0
    assert dafp.dafp_sparsity(importance, 0.5) == pytest.approx(3 / 7)  # 0.1, 0.5; 0.05
    for target in (0.1, 0.3, 0.5, 0.7):
        fraction = dafp.dafp_threshold(importance, target)
        assert dafp.dafp_sparsity(importance, fraction) == pytest.approx(np.ceil(target * 7) / 7)
    with pytest.raises(ValueError, match="needs more channels"):
        dafp.dafp_threshold(importance, 0.9)
    with pytest.raises(ValueError, match=r"Expected a number in \[0, 1\)"):
        dafp.dafp_keep(hand_built(), 1.0)


def test_keep_feeds_remove_filters():
    model = hand_built()
    scores = dafp_importance(model)
    keep = dafp.dafp_keep(model, 0.5, scores)
    for name, kept in keep.items():
        np.testing.assert_array_equal(kept, np.flatnonzero(scores[name] > 0.5 * scores[name].max()))
    small = remove_filters(model, keep)
    assert small.get_layer("c").filters == len(keep.get("c", range(5)))


def test_gamma_l1_serializes():
    regularizer = dafp.GammaL1(0.25)
    assert float(regularizer(np.array([2.0, -2.0], "float32"))) == pytest.approx(1.0)
    again = keras.regularizers.deserialize(keras.regularizers.serialize(regularizer))
    assert isinstance(again, dafp.GammaL1) and again.get_config() == {"strength": 0.25}
    with pytest.raises(ValueError, match="strength"):
        dafp.GammaL1(-1.0)


def digits_model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = inputs
    for i, filters in enumerate((40, 60)):  # 100 channels: 1% is one channel
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


@pytest.mark.parametrize("jit_compile", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_tuner_reaches_the_target_sparsity(jit_compile):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    model = digits_model(0)
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    tuner = dafp.SparsityTuner(target=0.5, step=1e-2, frequency=10)
    model.fit(x, digits.target, batch_size=64, epochs=8, verbose=0, callbacks=[tuner])
    sparsities = [h["sparsity"] for h in tuner.history]
    strengths = [h["strength"] for h in tuner.history]
    assert min(strengths) >= 0 and strengths[0] > 0  # lambda started at 0 and grew
    # The penalty reaches the target (measured at 2% of each layer's maximum) within 1%.
    assert min(abs(s - 0.5) for s in sparsities) <= 0.01 + 1e-9, sparsities
    # The bisection then prunes exactly half of the 100 channels.
    assert tuner.sparsity == 0.5
    assert sum(len(k) for k in tuner.keep.values()) == 50
    tuner.detach()
    assert model.get_layer("bn0").gamma.regularizer is None
