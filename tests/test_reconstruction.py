"""`Reconstruction`: one value object for how pruned filters are rebuilt, checked once, saved whole."""

import keras
import numpy as np
import pytest

import tf_transform_conv as tc
from tf_transform_conv.ops.assignment import fit_assignment
from tf_transform_conv.reconstruction import Reconstruction
from tf_transform_conv.reconstruction import skip_reason


def test_defaults_and_normalised_fields():
    rec = Reconstruction()
    assert rec.transforms == ("identity", "rot90", "rot180", "rot270", "flip_h", "flip_v",
                              "transpose", "antitranspose")
    assert (rec.transform_family, rec.criterion, rec.assign, rec.scale, rec.depth_groups,
            rec.allocation, rec.min_bases, rec.subtract_mean) == (
        "discrete", "reconstruction", "fit", True, 1, "per_layer", 1, False)
    assert Reconstruction(transforms=["identity", "rot180"]).transforms == ("identity", "rot180")
    assert Reconstruction(depth_groups=np.int64(2)).depth_groups == 2
    assert type(Reconstruction(depth_groups=np.int64(2)).depth_groups) is int


def test_it_is_a_hashable_value():
    a = Reconstruction(transforms="rotations", transform_family="scalar")
    b = Reconstruction(transforms=("identity", "rot90", "rot180", "rot270"),
                       transform_family="scalar")
    assert a == b and hash(a) == hash(b)
    assert a != a.replace(min_bases=2)
    with pytest.raises(AttributeError):
        a.min_bases = 3


def test_config_round_trip_is_json():
    import json

    rec = Reconstruction(transforms="flips", transform_family="affine", criterion="l1",
                         assign="modulo", scale=False, depth_groups=2, allocation="global",
                         min_bases=8, subtract_mean=True)
    config = json.loads(json.dumps(rec.get_config()))
    assert Reconstruction.from_config(config) == rec
    assert Reconstruction.get(config) == rec
    assert Reconstruction.get(None) == Reconstruction()
    assert Reconstruction.get(rec) is rec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(transforms="bogus"), r"Unknown transform 'bogus'"),
        (dict(transforms=["rot90"]), r"must include 'identity'"),
        (dict(transform_family="spin"), r"`transform_family`\. Expected one of"),
        (dict(criterion="random"), r"`criterion`\. Expected one of \['reconstruction'"),
        (dict(assign="nearest"), r"`assign`\. Expected one of \['fit', 'modulo'\]"),
        (dict(scale=1), r"`scale`\. Expected True or False\. Received scale=1\."),
        (dict(depth_groups=0), r"`depth_groups`\. Expected a strictly positive int"),
        (dict(allocation="layerwise"), r"`allocation`\. Expected one of \['per_layer', 'global'\]"),
        (dict(min_bases=0), r"`min_bases`\. Expected an int >= 1\. Received min_bases=0\."),
        (dict(subtract_mean="yes"), r"`subtract_mean`\. Expected True or False"),
    ],
)
def test_every_field_is_checked_where_it_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Reconstruction(**kwargs)
    with pytest.raises(ValueError, match=message):  # a replaced field too
        Reconstruction().replace(**kwargs)


def test_get_refuses_anything_else():
    with pytest.raises(ValueError, match=r"`reconstruction`\. Expected a tf_transform_conv\."
                                         r"Reconstruction .*Received reconstruction='d4'"):
        Reconstruction.get("d4")


def test_for_layer_drops_depth_groups_that_do_not_divide_the_input_channels():
    rgb = keras.layers.Conv2D(8, 3)
    rgb.build((None, 8, 8, 3))
    wide = keras.layers.Conv2D(8, 3)
    wide.build((None, 8, 8, 16))
    rec = Reconstruction(depth_groups=2, transform_family="scalar")
    assert rec.for_layer(rgb) == rec.replace(depth_groups=1)
    assert rec.for_layer(wide) is rec


def test_fit_is_fit_assignment_with_these_settings():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 8, 12)).astype("float32")
    rec = Reconstruction(transforms="rotations", transform_family="scalar", depth_groups=2,
                         assign="modulo", scale=False)
    fit = rec.fit(kernel, 3)
    want = fit_assignment(kernel, 3, transforms="rotations", depth_groups=2, scale=False,
                          transform_family="scalar", assign="modulo")
    np.testing.assert_array_equal(fit.assignment, want.assignment)
    np.testing.assert_allclose(fit.base_kernel, want.base_kernel)
    assert fit.layer_error == pytest.approx(want.layer_error)


def test_skip_reason_uses_the_transforms():
    wide = keras.layers.Conv2D(8, (3, 5))
    assert "need a square kernel" in Reconstruction(transforms="d4").skip_reason(wide)
    assert Reconstruction(transforms="flips").skip_reason(wide) == ""
    assert skip_reason(keras.layers.Conv2D(8, 1), "d4").startswith("1x1 kernel")


def test_a_wrapper_saves_its_reconstruction_whole(tmp_path):
    import tensorflow_model_optimization as tfmot

    rec = Reconstruction(transforms="rotations", transform_family="scalar", criterion="l1",
                         min_bases=2)
    model = keras.Sequential([keras.Input((6, 6, 4)), keras.layers.Conv2D(8, 3, name="c")])
    wrapped = tc.prune_model(model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0), rec)
    config = wrapped.layers[0].get_config()
    assert config["reconstruction"] == rec.get_config()
    assert not {"transforms", "criterion", "transform_family"} & set(config)
    tc.update_pruning_step(wrapped, 0)
    wrapped.save(tmp_path / "w.keras")
    loaded = keras.saving.load_model(tmp_path / "w.keras", safe_mode=True)
    assert loaded.layers[0].reconstruction == rec
