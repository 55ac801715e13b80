"""transform_model: one-shot conversion of existing Keras models."""

import keras
import numpy as np
import pytest

import tf_transform_conv as tc
from tf_transform_conv import TransformConv2D
from tf_transform_conv.cost import parameter_formula
from tf_transform_conv.ops.assignment import fit_assignment


def assert_close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1e-12, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


def nested_model():
    """Skip connection, a shared conv called twice, a nested Sequential, depthwise and 1x1."""
    keras.utils.set_random_seed(3)
    block = keras.Sequential(
        [keras.Input((8, 8, 8)), keras.layers.Conv2D(8, 3, padding="same", name="inner")],
        name="block",
    )
    shared = keras.layers.Conv2D(8, 3, padding="same", name="shared")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    y = shared(x)
    y = shared(y)
    x = keras.layers.Add()([x, y])
    x = block(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Conv2D(16, 1, name="pw")(x)
    x = keras.layers.Conv2D(16, 3, groups=2, name="grouped")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")


def test_sparsity_zero_is_exact_and_structure_is_kept(x):
    model = nested_model()
    new, report = tc.transform_model(
        model, sparsity=0.0, reconstruction=tc.Reconstruction(transforms="d4"))
    assert_close(new(x), model(x), 1e-5)
    status = {r.name: (r.converted, r.reason) for r in report}
    assert status["stem"][0] and status["shared"][0] and status["inner"][0]
    assert "depthwise" in status["dw"][1]
    assert "1x1" in status["pw"][1]
    assert "grouped" in status["grouped"][1]
    names = lambda m: [l.name for l in m.layers if not isinstance(l, keras.layers.InputLayer)]  # noqa: E731
    assert names(new) == names(model)
    assert isinstance(new.get_layer("block").get_layer("inner"), TransformConv2D)
    assert isinstance(new.get_layer("shared"), TransformConv2D)


def test_conversion_report_and_parameters(x):
    model = nested_model()
    new, report = tc.transform_model(
        model,
        base_ratio=0.25,
        layers=["stem", "shared"],
        reconstruction=tc.Reconstruction(transforms="rotations"),
    )
    by_name = {r.name: r for r in report}
    assert by_name["stem"].base_filters == 2 and by_name["stem"].converted
    assert by_name["stem"].params_after == parameter_formula(3, 3, 8, 2, True, True)
    assert by_name["inner"].reason == "not selected by `layers`"
    assert 0.0 < by_name["shared"].error < 1.0
    assert new.get_layer("stem").count_params() == by_name["stem"].params_after
    assert np.isfinite(np.asarray(new(x))).all()
    assert "total (convolutions)" in tc.convert.format_report(report)


def test_fitted_layer_holds_the_fit(x):
    """At a real sparsity, the converted layer's kernel is the fitted reconstruction."""
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3, name="c")])
    new, report = tc.transform_model(
        model, sparsity=0.5, reconstruction=tc.Reconstruction(transforms="d4", depth_groups=1))
    fit = fit_assignment(np.asarray(model.layers[0].kernel), 8, transforms="d4")
    assert_close(new.layers[0].materialized_kernel(), fit.reconstruct(), 1e-6)
    assert report[0].error == pytest.approx(fit.layer_error, rel=1e-6)


@pytest.mark.parametrize("family", ["scalar", "rotation", "affine", "general"])
def test_learned_family_starts_at_its_least_squares_fit(x, family, tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3, name="c")])
    new, report = tc.transform_model(
        model,
        sparsity=0.5,
        reconstruction=tc.Reconstruction(transforms="d4", transform_family=family),
    )
    layer = new.layers[0]
    kernel = np.asarray(model.layers[0].kernel)
    fit = fit_assignment(kernel, 8, transforms="d4", transform_family=family)
    assert_close(layer.materialized_kernel(), fit.reconstruct(), 1e-6)
    discrete = fit_assignment(kernel, 8, transforms="d4")
    assert report[0].error == pytest.approx(fit.layer_error, rel=1e-6)
    assert report[0].error < discrete.layer_error  # the learned operators help
    assert layer.transform_family == family
    np.testing.assert_array_equal(layer.templates, fit.templates)
    assert report[0].params_after == layer.count_params()
    path = tmp_path / "m.keras"
    new.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x), new(x))


def test_bad_arguments():
    model = nested_model()
    with pytest.raises(ValueError, match="exactly one of `base_ratio` or `sparsity`"):
        tc.transform_model(model)
    with pytest.raises(ValueError, match="exactly one"):
        tc.transform_model(model, base_ratio=0.5, sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparsity in \[0, 1\)"):
        tc.transform_model(model, sparsity=1.0)
    with pytest.raises(ValueError, match=r"No eligible layer is named \['nope'\]"):
        tc.transform_model(model, sparsity=0.5, layers=["nope"])
    with pytest.raises(ValueError, match="must include 'identity'"):
        tc.transform_model(
            model, sparsity=0.5, reconstruction=tc.Reconstruction(transforms=["rot90", "rot180"]))
    with pytest.raises(ValueError, match=r"transform_family.*Received transform_family='spin'"):
        tc.transform_model(
            model, sparsity=0.5, reconstruction=tc.Reconstruction(transform_family="spin"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "builder",
    [
        lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10),
        lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10),
        lambda: keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10),
    ],
    ids=["ResNet50", "MobileNetV2", "VGG16"],
)
def test_keras_applications_convert_run_and_save(builder, tmp_path):
    keras.utils.set_random_seed(0)
    model = builder()
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype("float32")
    exact, report = tc.transform_model(model, sparsity=0.0)
    assert_close(exact(x), model(x), 1e-5)
    assert [type(l).__name__ for l in exact.layers if not isinstance(l, TransformConv2D)] == [
        type(l).__name__ for l in model.layers if l.name not in {r.name for r in report if r.converted}
    ]
    compact, report = tc.transform_model(
        model, sparsity=0.5, reconstruction=tc.Reconstruction(transforms="d4"))
    converted = [r for r in report if r.converted]
    assert converted, "no layer converted"
    assert all(r.params_after < r.params_before for r in converted)
    path = tmp_path / "converted.keras"
    compact.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x), compact(x), rtol=1e-5, atol=1e-6)


def test_bad_option_types_are_named():
    model = nested_model()
    for kwargs, message in [
        (dict(scale="yes"), r"`scale`\. Expected True or False\. Received scale='yes'\."),
        (dict(depth_groups=0), r"`depth_groups`\. Expected a strictly positive int\. Received depth_groups=0\."),
        (dict(transforms="bogus"), r"Unknown transform 'bogus'"),
        (dict(layers=5), r"`layers`\. Expected None .*Received layers=5\."),
        (dict(criterion="random"), r"Received criterion='random'"),
    ]:
        with pytest.raises(ValueError, match=message):
            layers = kwargs.pop("layers", None)
            tc.transform_model(model, sparsity=0.5, reconstruction=tc.Reconstruction(**kwargs),
                               layers=layers)
    with pytest.raises(ValueError, match=r"Expected sparsity in \[0, 1\)\. Received sparsity='0\.5'\."):
        tc.transform_model(model, sparsity="0.5")
    with pytest.raises(ValueError, match=r"Expected base_ratio in \(0, 1\]\. Received base_ratio=True\."):
        tc.transform_model(model, base_ratio=True)


def test_depth_groups_that_do_not_divide_the_stem_give_it_one_group(x):
    """An RGB stem gets one depth group, the rest the requested two."""
    model = nested_model()
    new, report = tc.transform_model(
        model, sparsity=0.0, reconstruction=tc.Reconstruction(depth_groups=2))
    assert new.get_layer("stem").depth_groups == 1
    assert new.get_layer("shared").depth_groups == 2
    assert new.get_layer("block").get_layer("inner").depth_groups == 2
    assert_close(new(x), model(x), 1e-5)
    stem = model.get_layer("stem")
    fit = fit_assignment(np.asarray(stem.kernel), 4, transforms="d4", depth_groups=1)
    fitted, _ = tc.transform_model(
        model, sparsity=0.5, layers=["stem"], reconstruction=tc.Reconstruction(depth_groups=2))
    assert_close(fitted.get_layer("stem").materialized_kernel(), fit.reconstruct(), 1e-6)


def _unbuilt_sequential():
    return keras.Sequential([keras.layers.Conv2D(8, 3)])


VERBS = {
    "prune_model": lambda model: tc.prune_model(model, lambda step: (True, 0.5)),
    "transform_model": lambda model: tc.transform_model(model, sparsity=0.5),
    "strip_model": lambda model: tc.strip_model(model),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_model_verbs_need_a_built_keras_model(verb, tmp_path):
    run = VERBS[verb]
    for path in ("m.keras", tmp_path / "m.keras"):
        with pytest.raises(ValueError, match=(
                rf"{verb} needs a built keras.Model \(Sequential or Functional\)\. Received the "
                rf"path model='.*m\.keras': load the model first, model = "
                rf"keras\.saving\.load_model\('.*m\.keras'\)")):
            run(path)
    with pytest.raises(ValueError, match=rf"{verb} needs a built keras.Model.*type Conv2D: a layer; put it in a model"):
        run(keras.layers.Conv2D(8, 3))
    with pytest.raises(ValueError, match=rf"{verb} needs a built keras.Model.*type dict\."):
        run({})
    with pytest.raises(ValueError, match=(
            rf"{verb} needs a built model, and Sequential '.*' is not built.*"
            r"keras\.Input\(\(rows, cols, channels\)\).*model\.build\(\(None, rows, cols, channels\)\)")):
        run(_unbuilt_sequential())
    built = _unbuilt_sequential()
    built.build((None, 8, 8, 3))  # built without an Input: accepted
    run(built)


def test_models_with_a_lambda_layer_are_rewritten_in_memory():
    """Cloning for a rewrite loads nothing: a Lambda layer is kept as it is (no safe-mode error)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="c")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="d")(x))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    converted, report = tc.transform_model(model, base_ratio=1.0)
    assert [r.converted for r in report] == [True, True]
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)
    wrapped = tc.prune_model(model, lambda step: (False, 0.0))
    assert converted.get_layer("double") is model.get_layer("double")
    np.testing.assert_allclose(tc.strip_model(wrapped)(x), model(x), rtol=1e-5, atol=1e-5)
