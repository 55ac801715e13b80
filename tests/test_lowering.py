"""The grouped TFLite form of TransformConv2D: its plan against numpy, its files against Keras."""

import keras
import numpy as np
import pytest

from tf_transform_conv import TransformConv2D
from tf_transform_conv import export
from tf_transform_conv.export import grouped as grouped_lib
from tf_transform_conv.export import lowering
from tf_transform_conv.layers import ChannelGather
from tf_transform_conv.ops import transforms as transforms_lib

from tflite_util import tensor_shapes

RTOL = 1e-5

CASES = {
    "rotations_same": dict(filters=16, kernel_size=3, base_filters=4, transforms="rotations",
                           padding="same", activation="relu"),
    "d4_stride2_valid_scale": dict(filters=16, kernel_size=3, base_filters=2, transforms="d4",
                                   strides=2, padding="valid", scale=True),
    "flips_3x5_dilated": dict(filters=8, kernel_size=(3, 5), base_filters=2, transforms="flips",
                              padding="same", dilation_rate=2, use_bias=False),
    "depth_groups_2": dict(filters=16, kernel_size=3, base_filters=4, transforms="rotations",
                           padding="same", depth_groups=2, scale=True),
    "shifts_random_assignment": dict(
        filters=10, kernel_size=3, base_filters=3, transforms="shifts", padding="same",
        activation="relu",
        assignment=np.random.default_rng(3).integers(0, 3, size=(1, 10, 2)).tolist()),
    "softmax_after_gather": dict(
        filters=6, kernel_size=3, base_filters=2, transforms="rotations", padding="same",
        activation="softmax", assignment=[[[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [0, 2]]]),
    "channels_first": dict(filters=8, kernel_size=3, base_filters=2, transforms="rotations",
                           padding="same", data_format="channels_first"),
    # The learned families: the spread kernel holds the operators' entries.
    "scalar_rotations": dict(filters=16, kernel_size=3, base_filters=4, transforms="rotations",
                             padding="same", transform_family="scalar", activation="relu"),
    "rotation_groups_2": dict(filters=16, kernel_size=3, base_filters=4, transforms="rotations",
                              padding="same", depth_groups=2, scale=True,
                              transform_family="rotation"),
    "affine_shifts_assignment": dict(
        filters=10, kernel_size=3, base_filters=3, transforms="shifts", padding="same",
        transform_family="affine",
        assignment=np.random.default_rng(4).integers(0, 3, size=(1, 10, 2)).tolist()),
    "general_d4_stride2": dict(filters=16, kernel_size=3, base_filters=2, transforms="d4",
                               strides=2, padding="valid", transform_family="general"),
    "rotations_stride2_same_scalar": dict(
        filters=16, kernel_size=3, base_filters=4, transforms="rotations", strides=2,
        padding="same", transform_family="scalar", activation="relu"),
}

# The most nonzeros in one output's spread column: taps per tap (discrete and
# scalar: one), or four (bilinear sampling), or every tap (general).
NONZEROS_PER_TAP = {"discrete": 1, "scalar": 1, "rotation": 4, "affine": 4, "general": None}


def layer_model(config, seed=0, channels=8):
    rng = np.random.default_rng(seed)
    shape = ((channels, 11, 11) if config.get("data_format") == "channels_first"
             else (11, 11, channels))
    inputs = keras.Input(shape)
    outputs = TransformConv2D(**config, name="tc")(inputs)
    model = keras.Model(inputs, outputs)
    for weight in model.weights:  # random scales and biases, not ones and zeros
        noise = rng.normal(size=weight.shape)
        if weight.name == "transform":  # learned operators moved off the identity
            noise = np.asarray(weight) + 0.4 * noise
        weight.assign(noise.astype("float32"))
    return model


def kernel_from_plan(plan, layer):
    """The dense kernel the grouped form computes, composed in numpy."""
    kh, kw = layer.kernel_size
    taps, g = kh * kw, layer.depth_groups
    product = plan.product_kernel[0, 0]  # (cg, g * n * taps)
    cg = product.shape[0]
    n = product.shape[1] // (g * taps)
    spread = plan.spread_kernel  # (kh, kw, taps, g * n * M)
    m = plan.slots
    kernel = np.zeros((kh, kw, cg * g, layer.filters))
    for k in range(g):
        for o in range(layer.filters):
            out = plan.output_index[k, o]
            block = (out // m) * taps  # the group's first product channel
            assert block // (n * taps) == k  # the group of the output's depth group
            for s in range(taps):
                kernel[:, :, k * cg:(k + 1) * cg, o] += (
                    spread[:, :, s, out][:, :, None] * product[:, block + s][None, None, :]
                )
    return kernel


def kernel_from_phases(plan, layer):
    """The dense kernel a stride-2 plan's pixel phases compute, composed in numpy."""
    kh, kw = layer.kernel_size
    taps = kh * kw
    groups = plan.product_kernel.shape[-1] // taps
    kernel = np.zeros((kh, kw, plan.product_kernel.shape[2], plan.spread_outputs()))
    for phase in plan.phases:
        used = phase.product_kernel.shape[-1] // groups
        for out in range(plan.spread_outputs()):
            block = (out // plan.slots) * used  # the output's group
            for i in range(phase.kernel_rows):
                for j in range(phase.kernel_cols):
                    kernel[phase.row + 2 * i, phase.col + 2 * j, :, out] += (
                        phase.product_kernel[0, 0, :, block:block + used]
                        @ phase.spread_kernel[i, j, :, out])
    return kernel[..., plan.output_index[0]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_composes_to_the_materialized_kernel(case):
    layer = layer_model(CASES[case]).get_layer("tc")
    plan = grouped_lib.grouped_plan(layer)
    expected = keras.ops.convert_to_numpy(layer.materialized_kernel())
    np.testing.assert_allclose(kernel_from_plan(plan, layer), expected, rtol=1e-6, atol=1e-6)
    # The spread kernel stores each operator's nonzeros: for the discrete and
    # scalar families one per (output, tap), kh*kw of (kh*kw)**2.
    taps = np.prod(layer.kernel_size)
    nonzeros = (plan.spread_kernel != 0).reshape(-1, plan.spread_outputs()).sum(axis=0)
    per_tap = NONZEROS_PER_TAP[layer.transform_family] or taps
    assert nonzeros.max() <= per_tap * taps
    if plan.phases is not None:
        np.testing.assert_allclose(kernel_from_phases(plan, layer), expected,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case, product_taps", [
    # Under rotations (and d4) a corner stays a corner: 4 corners on the
    # (even, even) phase, 4 edges on two phases, the centre on one: 13 of 36.
    ("d4_stride2_valid_scale", 13), ("rotations_stride2_same_scalar", 13),
    # The general family moves every tap anywhere: no phases.
    ("general_d4_stride2", None),
])
def test_stride_two_layers_multiply_each_base_tap_only_on_its_phases(case, product_taps):
    plan = grouped_lib.grouped_plan(layer_model(CASES[case]).get_layer("tc"))
    assert plan.product_taps() == product_taps
    if plan.phases is not None:
        # The edge phases share one product kernel: the file stores it once.
        kernels = {p.product_kernel.tobytes() for p in plan.phases}
        assert len(kernels) == 3


@pytest.mark.parametrize("size", [10, 11])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_stride_two_phases_match_the_layer(size, padding):
    """Odd and even inputs: TensorFlow's "same" pads the bottom and right."""
    import tensorflow as tf

    keras.utils.set_random_seed(size)
    layer = TransformConv2D(16, 3, base_filters=4, transforms="rotations", strides=2,
                            padding=padding, scale=True)
    x = np.random.default_rng(size).normal(size=(2, size, size, 8)).astype("float32")
    layer(x)
    layer.scale_weight.assign(np.random.default_rng(0).uniform(0.5, 2, 16).astype("float32"))
    grouped = grouped_lib.GroupedTransformConv2D.from_layer(layer)
    assert grouped.plan.phases is not None
    expected = keras.ops.convert_to_numpy(layer(x))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(grouped(x).numpy(), expected, atol=RTOL * scale)
    xla = tf.function(grouped.call, jit_compile=True)(tf.constant(x)).numpy()
    np.testing.assert_allclose(xla, expected, atol=RTOL * scale)


def assert_computes_the_layer(grouped, model, layer):
    """`grouped` computes `layer`'s outputs, eagerly and under XLA."""
    import tensorflow as tf

    x = np.random.default_rng(2).normal(size=(2,) + tuple(model.inputs[0].shape[1:]))
    x = x.astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(grouped(x).numpy(), expected, atol=RTOL * scale)
    xla = tf.function(grouped.call, jit_compile=True)(tf.constant(x)).numpy()
    np.testing.assert_allclose(xla, expected, atol=RTOL * scale)


@pytest.mark.parametrize("case", ["rotations_same", "depth_groups_2", "softmax_after_gather",
                                  "channels_first"])
def test_grouped_layer_matches_the_keras_layer_in_tensorflow(case):
    """Before any conversion: the grouped layer itself, eagerly and under XLA."""
    model = layer_model(CASES[case])
    layer = model.get_layer("tc")
    grouped = grouped_lib.GroupedTransformConv2D.from_layer(layer)
    assert_computes_the_layer(grouped, model, layer)


def test_default_assignment_is_restored_by_a_transpose():
    layer = layer_model(CASES["rotations_same"]).get_layer("tc")
    plan = grouped_lib.grouped_plan(layer)
    assert plan.transpose == (4, 4) and not plan.identity
    one_base = layer_model(dict(filters=4, kernel_size=3, base_filters=1,
                                transforms="rotations", padding="same")).get_layer("tc")
    assert grouped_lib.grouped_plan(one_base).identity


@pytest.fixture(scope="module")
def grouped_exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    results = {}
    for case, config in CASES.items():
        model = layer_model(config)
        results[case] = model, export.export_tflite(model, folder / f"{case}.tflite",
                                                    lowering="grouped")
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_file_matches_keras(grouped_exports, case):
    model, result = grouped_exports[case]
    layer = model.get_layer("tc")
    phases = grouped_lib.grouped_plan(layer).phases
    # Two convolutions, or two per pixel phase (stride 2), each phase on a slice;
    # a third, 1x1 with a 0/1 kernel, where the layer picks its filters out of
    # a padded or summed spread (the export keeps a native order otherwise and
    # gathers the model's output back to filter order).
    deployed, _ = export.deployment_model(model, lowering="grouped")
    grouped = [l for l in deployed.layers if isinstance(l, grouped_lib.GroupedTransformConv2D)]
    gathers = sum(isinstance(l, ChannelGather) for l in deployed.layers)
    plan = grouped[0].plan
    selects = not plan.identity and plan.transpose is None
    assert result.op_counts["CONV_2D"] == 2 * len(phases or [0]) + selects, result.op_counts
    assert result.op_counts.get("GATHER", 0) == gathers, result.op_counts
    slices = result.op_counts.get("STRIDED_SLICE", 0) + result.op_counts.get("SLICE", 0)
    assert slices == (len(phases) if phases else 0), result.op_counts
    # A sparse spread kernel is stored sparse and densified once; the general
    # family's operators fill it, so it is stored dense.
    sparse = layer.transform_family != "general"
    assert (result.op_counts.get("DENSIFY", 0) > 0) == sparse, result.op_counts
    if layer.get_config()["activation"] == "relu":  # applied before reordering: fused
        assert "RELU" not in result.op_counts, result.op_counts
    x = np.random.default_rng(1).normal(size=(3,) + tuple(model.inputs[0].shape[1:]))
    check = export.verify_tflite(result.path, model, x.astype("float32"), rtol=RTOL)
    assert check.max_rel_diff <= RTOL
    # The file holds the bases and the sparse spread kernel, not the dense kernel.
    dense = (layer.filters, *layer.kernel_size, layer.base_kernel.shape[2])
    assert dense not in tensor_shapes(result.path)


def test_grouped_is_smaller_and_has_fewer_operators_than_slices(tmp_path):
    config = dict(filters=64, kernel_size=3, base_filters=16, transforms="rotations",
                  padding="same")
    model = layer_model(config)
    grouped = export.export_tflite(model, tmp_path / "g.tflite", lowering="grouped")
    slices = export.export_tflite(model, tmp_path / "s.tflite", lowering="slices")
    auto = export.export_tflite(model, tmp_path / "a.tflite")
    assert auto.op_counts == grouped.op_counts
    assert grouped.num_ops <= 6 < 40 < slices.num_ops
    assert grouped.bytes < slices.bytes
    taps, n, cin, f = 9, 16, 8, 64
    # Bases and bias, plus one stored value per (output, tap) and its index.
    assert grouped.bytes <= 4 * (taps * cin * n + f) + 4 * taps * f + 2 * taps * f + 4096


def test_auto_writes_a_lopsided_assignment_grouped(tmp_path):
    """The padded grouped form is exact and `auto` takes it (measured against
    slices for fitted assignments: `lowering.lowering_choice`)."""
    assignment = np.zeros((1, 12, 2), np.int64)
    assignment[0, :, 1] = np.arange(12) % 4
    assignment[0, 10:, 0] = [1, 2]  # base 0 builds 10 filters, bases 1 and 2 one each
    # 32 input channels: the grouped form is then smaller than the dense
    # kernel in the file too (`lowering_choice` weighs that last).
    model = layer_model(dict(filters=12, kernel_size=3, base_filters=3, transforms="rotations",
                             padding="same", assignment=assignment.tolist()), channels=32)
    layer = model.get_layer("tc")
    form, reason = lowering.lowering_choice(layer)
    assert form == "grouped" and "padded to 2.50x the filters" in reason, reason
    # 30 spread outputs for 12 filters.
    assert grouped_lib.grouped_plan(layer).spread_outputs() == 30
    x = np.random.default_rng(1).normal(size=(2, 11, 11, 32)).astype("float32")
    result = export.export_tflite(model, tmp_path / "m.tflite")
    assert result.lowerings == {"tc": "grouped"}
    # The spread kernel and the 0/1 selection of the 12 filters, both stored sparse.
    assert result.op_counts["DENSIFY"] == 2 and "STRIDED_SLICE" not in result.op_counts
    assert "GATHER" not in result.op_counts
    export.verify_tflite(result.path, model, x, rtol=RTOL)
    # Asked for, slices are exact too.
    slices = export.export_tflite(model, tmp_path / "s.tflite", lowering="slices")
    assert "STRIDED_SLICE" in slices.op_counts and "DENSIFY" not in slices.op_counts
    export.verify_tflite(slices.path, model, x, rtol=RTOL)


@pytest.mark.parametrize("channels, expected", [(16, "dense"), (32, "slices")])
def test_auto_at_two_filters_per_base(channels, expected):
    """Measured: 2-wide spread groups lose to slices from 32 input channels; at 16
    the dense layer does fewer multiply-adds (2,304 per pixel against 1,152 + 1,296)
    in a kernel 1.45x the grouped form's bytes."""
    inputs = keras.Input((8, 8, channels))
    layer = TransformConv2D(channels, 3, base_ratio=0.5, transforms=["identity", "rot180"],
                            padding="same")
    layer(inputs)
    form, reason = lowering.lowering_choice(layer)
    assert form == expected, reason
    assert lowering.lowering_choice(layer, "grouped")[0] == "grouped"
    four = TransformConv2D(channels, 3, base_ratio=0.25, transforms="rotations", padding="same")
    four(inputs)
    assert lowering.lowering_choice(four)[0] == "grouped"


@pytest.mark.parametrize("ratio, transforms", [(0.5, ["identity", "rot180"]),
                                               (0.25, "rotations")])
def test_auto_writes_a_three_channel_stem_dense(ratio, transforms, tmp_path):
    """Few input channels: the dense kernel is cheaper to run and barely larger."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = TransformConv2D(32, 3, strides=2, base_ratio=ratio, transforms=transforms,
                        padding="same", name="stem")(inputs)
    x = TransformConv2D(64, 3, base_ratio=0.25, transforms="rotations", padding="same",
                        name="body")(x)
    model = keras.Model(inputs, x)
    stem = model.get_layer("stem")
    form, reason = lowering.lowering_choice(stem)
    assert form == "dense" and "multiply-adds" in reason, reason
    assert lowering.lowering_choice(model.get_layer("body"))[0] == "grouped"
    result = export.export_tflite(model, tmp_path / "m.tflite")
    assert result.lowerings == {"stem": "dense", "body": "grouped"}
    shapes = tensor_shapes(result.path)
    assert (32, 3, 3, 3) in shapes  # the stem's materialised kernel
    assert (64, 3, 3, 32) not in shapes  # not the body's
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")
    export.verify_tflite(result.path, model, x, rtol=RTOL)
    # Asked for, the stem is written grouped all the same.
    assert lowering.lowering_choice(stem, "grouped")[0] == "grouped"


def test_unknown_lowering_is_an_error(tmp_path):
    model = layer_model(CASES["rotations_same"])
    with pytest.raises(ValueError, match=r"Expected one of \['auto', 'grouped', 'slices', 'dense'\]"):
        export.export_tflite(model, tmp_path / "m.tflite", lowering="fast")
    with pytest.raises(ValueError, match=r"for layer 'tc'.*Received 'fast'"):
        export.export_tflite(model, tmp_path / "m.tflite", lowering={"tc": "fast"})
    with pytest.raises(ValueError, match=r"not TransformConv2D layers of the model: \['conv'\]"):
        export.export_tflite(model, tmp_path / "m.tflite", lowering={"conv": "dense"})


def test_lowering_per_layer(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 16))
    x = TransformConv2D(32, 3, base_filters=8, transforms="rotations", padding="same",
                        name="first")(inputs)
    x = TransformConv2D(32, 3, base_filters=8, transforms="rotations", padding="same",
                        name="second")(x)
    x = TransformConv2D(32, 3, base_filters=8, transforms="rotations", padding="same",
                        name="third")(x)
    model = keras.Model(inputs, x)
    result = export.export_tflite(model, tmp_path / "m.tflite",
                                  lowering={"first": "dense", "second": "slices"})
    assert result.lowerings == {"first": "dense", "second": "slices", "third": "grouped"}
    shapes = tensor_shapes(result.path)
    assert (32, 3, 3, 16) in shapes and (32, 3, 3, 32) not in shapes
    assert result.op_counts["STRIDED_SLICE"] > 0 and result.op_counts["DENSIFY"] == 1
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 16)).astype("float32")
    export.verify_tflite(result.path, model, x, rtol=RTOL)


def test_tap_tables_cover_every_transform_in_the_plan():
    """Each output's spread column holds its transform's tap table, times its scale."""
    layer = layer_model(CASES["d4_stride2_valid_scale"]).get_layer("tc")
    plan = grouped_lib.grouped_plan(layer)
    src = transforms_lib.tap_tables(layer.transforms, layer.kernel_size)
    scale = layer.scale_weight.numpy()
    spread = plan.spread_kernel.reshape(9, 9, -1)
    for o, (b, t) in enumerate(layer.assignment[0]):
        column = spread[:, :, plan.output_index[0, o]]
        for u in range(9):
            expected = np.zeros(9)
            expected[src[t, u]] = scale[o]
            np.testing.assert_array_equal(column[u], expected)


def test_scalar_family_file_costs_what_the_discrete_file_costs(tmp_path):
    """The multipliers ride in the spread kernel's nonzeros: same operators, same bytes."""
    config = dict(filters=64, kernel_size=3, base_filters=16, transforms="rotations",
                  padding="same")
    discrete = export.export_tflite(layer_model(config), tmp_path / "d.tflite")
    scalar = export.export_tflite(layer_model(dict(config, transform_family="scalar")),
                                  tmp_path / "s.tflite")
    assert scalar.op_counts == discrete.op_counts
    assert scalar.bytes <= 1.1 * discrete.bytes


@pytest.mark.parametrize("family", ["rotation", "affine", "general"])
def test_auto_writes_dense_operator_families_grouped(family):
    """Where the discrete family's 2-wide groups lose to slices, a family whose
    slices multiply-add every pair of taps is still written grouped."""
    inputs = keras.Input((8, 8, 32))
    config = dict(filters=32, kernel_size=3, base_ratio=0.5, transforms=["identity", "rot180"],
                  padding="same")
    discrete = TransformConv2D(**config)
    discrete(inputs)
    assert lowering.lowering_choice(discrete)[0] == "slices"
    learned = TransformConv2D(**config, transform_family=family)
    learned(inputs)
    form, reason = lowering.lowering_choice(learned)
    assert form == "grouped" and "pair of taps" in reason, reason


@pytest.mark.parametrize("case, activation", [
    ("shifts_random_assignment", "relu"), ("shifts_random_assignment", "sigmoid"),
    ("softmax_after_gather", "softmax"), ("depth_groups_2", None),
    ("affine_shifts_assignment", None)])
def test_normalized_spread_matches_the_keras_layer(case, activation):
    """The int8 files' form: where a selection follows the spread convolution,
    every spread channel peaks at exactly 1 and the selection holds the gains;
    the layer computes the same outputs, with an activation that does not
    commute with a scale (sigmoid) applied after the selection."""
    model = layer_model({**CASES[case], "activation": activation, "scale": True})
    layer = model.get_layer("tc")
    # int8 files normalize layers of more than 64 filters; these are smaller.
    grouped = grouped_lib.GroupedTransformConv2D.from_layer(
        layer, plan=grouped_lib.grouped_plan(layer).normalized())
    plan = grouped.plan
    assert plan.selects() and plan.normalized_spread()
    assert not grouped_lib.grouped_plan(layer).normalized_spread()  # float files: as planned
    kernel, _, gains = plan.written_spread()
    peaks = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
    np.testing.assert_array_equal(peaks, np.ones_like(peaks))
    planned = np.abs(plan.spread_kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
    np.testing.assert_array_equal(gains, np.where(planned > 0, planned, 1.0))
    assert np.any(gains != 1.0)  # random scales: the channels peaked apart
    assert_computes_the_layer(grouped, model, layer)


def test_a_stride_two_layer_keeps_its_spread_kernels():
    """Pixel phases sum their spread convolutions before the selection: no
    normalization, in any file."""
    layer = layer_model(CASES["d4_stride2_valid_scale"]).get_layer("tc")
    plan = grouped_lib.grouped_plan(layer).normalized()
    assert plan.phases is not None and not plan.normalized_spread()
    assert plan.written_spread()[2] is None


def _numpy_grouped_conv(x, kernel, groups):
    """A "valid", stride-1 grouped convolution in numpy: `x` (b, h, w, c),
    `kernel` (kh, kw, c / groups, outputs)."""
    kh, kw, width, outputs = kernel.shape
    per = outputs // groups
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], h, w, outputs))
    for g in range(groups):
        part = x[..., g * width:(g + 1) * width]
        for i in range(kh):
            for j in range(kw):
                y[..., g * per:(g + 1) * per] += part[:, i:i + h, j:j + w] @ \
                    kernel[i, j, :, g * per:(g + 1) * per]
    return y


@pytest.mark.parametrize("groups, merged", [(6, 1), (6, 2), (6, 3), (6, 6)])
def test_merged_groups_are_the_same_convolution(groups, merged):
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(3, 2, 4, groups * 3))
    x = rng.normal(size=(2, 6, 5, groups * 4))
    merged_kernel = grouped_lib.merge_groups(kernel, groups, merged)
    assert merged_kernel.shape == (3, 2, 4 * groups // merged, groups * 3)
    np.testing.assert_allclose(_numpy_grouped_conv(x, merged_kernel, merged),
                               _numpy_grouped_conv(x, kernel, groups), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="merge 6 groups"):
        grouped_lib.merge_groups(kernel, groups, 4)


CASES_INT8 = ["rotations_same", "depth_groups_2", "shifts_random_assignment",
              "d4_stride2_valid_scale", "affine_shifts_assignment",
              "rotations_stride2_same_scalar"]


@pytest.mark.parametrize("case", CASES_INT8)
def test_merged_spread_groups_match_the_keras_layer(case):
    """The spread convolution written with one group (every base's kernel on
    the block diagonal, padded slots kept): the same outputs, eagerly and
    under XLA, pixel phases and depth groups included."""
    model = layer_model(CASES[case])
    layer = model.get_layer("tc")
    plan = grouped_lib.grouped_plan(layer)
    assert plan.base_groups() == layer.base_filters * layer.depth_groups
    one = grouped_lib.GroupedTransformConv2D.from_layer(layer, plan=plan.with_spread_groups(1))
    kernel = (one.plan.written_spread()[0] if plan.phases is None
              else one.plan.written_phase_spread(plan.phases[0]))
    width = (plan.spread_kernel if plan.phases is None else plan.phases[0].spread_kernel).shape[2]
    assert kernel.shape[2:] == (plan.base_groups() * width, plan.spread_outputs())
    assert_computes_the_layer(one, model, layer)
    floating = grouped_lib.GroupedTransformConv2D.from_layer(layer, quantization="float16")
    assert floating.plan.spread_groups is None and not floating.plan.single_group


@pytest.mark.parametrize("case", CASES_INT8)
def test_single_group_spread_matches_the_keras_layer(case):
    """The int8 files' form of a layer of up to 64 filters: one spread group
    writing the filters themselves (no padded slots, depth groups summed in
    it, no selection after it), the same outputs, eagerly and under XLA."""
    model = layer_model(CASES[case])
    layer = model.get_layer("tc")
    grouped = grouped_lib.GroupedTransformConv2D.from_layer(layer, quantization="int8")
    plan = grouped.plan
    assert plan.single_group and plan.writes_filters() and not plan.selects()
    assert plan.written_outputs() == layer.filters
    kernel = (plan.written_spread()[0] if plan.phases is None
              else plan.written_phase_spread(plan.phases[0]))
    assert kernel.shape[-1] == layer.filters
    assert_computes_the_layer(grouped, model, layer)


@pytest.mark.parametrize("filters, base_filters, transforms, expected", [
    (64, 16, "rotations", 1),    # 64 outputs: one group
    (256, 64, "rotations", 4),   # 64 outputs per group
    (512, 128, "rotations", 8),
    (64, 32, ("identity", "rot180"), 1),  # 32 bases of 2 filters
    (112, 16, "d4_partial", 2),  # 112 outputs: 2 groups of 56
    (16, 16, ("identity",), 1),
])
def test_int8_spread_groups(filters, base_filters, transforms, expected):
    if transforms == "d4_partial":
        transforms = transforms_lib.resolve_transforms("d4")[:7]
    layer = layer_model(dict(filters=filters, kernel_size=3, base_filters=base_filters,
                             transforms=transforms, padding="same"), channels=4).get_layer("tc")
    plan = grouped_lib.grouped_plan(layer)
    assert plan.int8_spread_groups() == expected
    int8 = plan.for_quantization("int8")
    if filters <= grouped_lib.INT8_SPREAD_GROUP_OUTPUTS:  # one group of the filters
        assert int8.single_group and int8.spread_groups is None
    else:
        assert not int8.single_group and int8.spread_groups == expected
    assert plan.for_quantization(None) is plan
    with pytest.raises(ValueError, match="positive divisor"):
        plan.with_spread_groups(3)
