"""Transform families: the operators against independent references, the sign
convention, differentiability and the least-squares fits.

Tolerances: float64 operators agree to 1e-12; the keras.ops (float32) versions
to 1e-5.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import reference
from tf_transform_conv.ops import families
from tf_transform_conv.ops import transforms as transforms_lib

LEARNED = ("scalar", "rotation", "affine", "general")
KERNEL_SIZES = [(3, 3), (5, 5), (3, 5), (2, 3), (1, 1)]


def random_params(family, kernel_size, rng, count=None, spread=0.4):
    """Parameters moved off the identity (off the bilinear grid, almost surely)."""
    identity = families.identity_params(family, kernel_size).astype(np.float64)
    count = () if count is None else (count,) if isinstance(count, int) else tuple(count)
    shape = count + identity.shape
    return identity + rng.normal(scale=spread, size=shape)


# ----------------------------------------------------------------------------
# The sign convention: every discrete transform is a special case


@pytest.mark.parametrize(
    "name, kernel_size",
    [
        (name, size)
        for size in KERNEL_SIZES[:4]
        for name in transforms_lib.TRANSFORM_NAMES
        if size[0] == size[1] or not transforms_lib.needs_square(name)
    ],
)
def test_affine_maps_reproduce_every_discrete_transform(name, kernel_size):
    base = np.random.default_rng(0).normal(size=kernel_size + (4,))
    matrix = families.sampling_operator(families.affine_matrix(name), kernel_size)
    np.testing.assert_allclose(
        families.apply_operator(base, matrix), reference.TRANSFORMS[name](base), atol=1e-12
    )


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 5)])
@pytest.mark.parametrize("name, angle", [("identity", 0.0), ("rot90", np.pi / 2),
                                         ("rot180", np.pi), ("rot270", 3 * np.pi / 2)])
def test_rotation_by_quarter_turns_reproduces_rot90(name, angle, kernel_size):
    assert families.rotation_angle(name) == pytest.approx(angle)
    base = np.random.default_rng(1).normal(size=kernel_size + (3,))
    matrix = families.operator("rotation", [angle, 1.0], kernel_size)
    np.testing.assert_allclose(
        families.apply_operator(base, matrix), reference.TRANSFORMS[name](base), atol=1e-12
    )
    # The keras.ops version, in float32.
    params = tf.constant([[angle, 1.0]], tf.float32)
    np.testing.assert_allclose(
        families.operators("rotation", params, kernel_size)[0].numpy(), matrix, atol=1e-6
    )


def test_flips_are_not_rotations():
    assert families.rotation_angle("flip_h") is None
    assert families.rotation_angle("shift_up") is None


# ----------------------------------------------------------------------------
# The operators against independent references


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
@pytest.mark.parametrize("family", LEARNED)
def test_operator_matches_reference(family, kernel_size):
    rng = np.random.default_rng(2)
    for _ in range(5):
        params = random_params(family, kernel_size, rng)
        np.testing.assert_allclose(
            families.operator(family, params, kernel_size),
            reference.learned_operator(family, params, kernel_size),
            atol=1e-12,
        )


def test_sampling_matches_scipy_bilinear_interpolation():
    rng = np.random.default_rng(3)
    for kernel_size in [(3, 3), (5, 5), (3, 5)]:
        kh, kw = kernel_size
        x, y = families.tap_coordinates(kernel_size)
        for _ in range(10):
            matrix = np.eye(2, 3) + rng.normal(scale=0.5, size=(2, 3))
            base = rng.normal(size=kernel_size)
            px = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2] + (kw - 1) / 2
            py = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2] + (kh - 1) / 2
            # grid-constant: zero outside the grid, interpolated up to it.
            expected = ndimage.map_coordinates(base, [py, px], order=1, mode="grid-constant")
            got = families.sampling_operator(matrix, kernel_size) @ base.reshape(-1)
            np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
@pytest.mark.parametrize("family", families.FAMILIES)
def test_identity_params_give_the_identity(family, kernel_size):
    taps = kernel_size[0] * kernel_size[1]
    params = families.identity_params(family, kernel_size)
    assert params.shape == (families.num_params(family, kernel_size),)
    np.testing.assert_array_equal(families.operator(family, params, kernel_size), np.eye(taps))
    if family != "discrete":
        got = families.operators(family, tf.constant(params[None]), kernel_size)[0]
        np.testing.assert_array_equal(got.numpy(), np.eye(taps))


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
@pytest.mark.parametrize("family", LEARNED)
def test_keras_operators_match_numpy(family, kernel_size):
    rng = np.random.default_rng(4)
    params = random_params(family, kernel_size, rng, count=(2, 7))
    got = families.operators(family, tf.constant(params, tf.float32), kernel_size).numpy()
    np.testing.assert_allclose(got, families.operator(family, params, kernel_size), atol=1e-5)


@pytest.mark.parametrize("family", families.SAMPLED)
def test_sampled_operators_have_at_most_four_nonzeros_per_row(family):
    rng = np.random.default_rng(5)
    for kernel_size in [(3, 3), (5, 5)]:
        matrix = families.operator(family, random_params(family, kernel_size, rng, 50), kernel_size)
        assert (np.count_nonzero(np.abs(matrix) > 1e-15, axis=-1) <= 4).all()


@pytest.mark.parametrize("family", families.SAMPLED)
def test_sampled_operators_are_differentiable_at_the_discrete_start(family):
    """At the identity every mapped point is a tap centre: the derivative must
    still reach the parameters (one-sided, towards the next tap), or a layer
    started from its discrete transform would never move."""
    params = tf.Variable(families.identity_params(family, 3)[None])
    probe = tf.constant(np.random.default_rng(6).normal(size=(9, 9)), tf.float32)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(families.operators(family, params, 3) * probe)
    gradient = tape.gradient(value, params).numpy()
    angle_or_matrix = gradient[0, :1] if family == "rotation" else gradient[0]
    assert np.abs(angle_or_matrix).max() > 1e-3, gradient


def test_keras_gradient_matches_central_differences():
    rng = np.random.default_rng(7)
    probe = rng.normal(size=(9, 9))
    for family in LEARNED:
        params = random_params(family, 3, rng, count=1)
        variable = tf.Variable(params, dtype=tf.float64)
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(families.operators(family, variable, 3) * probe)
        gradient = tape.gradient(value, variable).numpy()[0]
        step = 1e-6
        for p in range(params.shape[-1]):
            delta = np.zeros_like(params)
            delta[0, p] = step
            numeric = (
                np.sum(families.operator(family, params + delta, 3) * probe)
                - np.sum(families.operator(family, params - delta, 3) * probe)
            ) / (2 * step)
            assert gradient[p] == pytest.approx(numeric, rel=1e-5, abs=1e-6), (family, p)


def test_permutation_matrix_is_the_tap_table():
    table = transforms_lib.tap_table("shift_right", 3)
    base = np.random.default_rng(8).normal(size=(3, 3, 2))
    np.testing.assert_array_equal(
        families.apply_operator(base, families.permutation_matrix(table)),
        reference.TRANSFORMS["shift_right"](base),
    )


# ----------------------------------------------------------------------------
# Least-squares fits


def planted(family, count, channels, rng, spread):
    params = random_params(family, 3, rng, count=count, spread=spread)
    if family == "rotation":
        params[:, 0] = rng.uniform(-1.2, 1.2, count)
        params[:, 1] = rng.uniform(0.5, 2.0, count)
    sources = rng.normal(size=(count, 9, channels))
    return params, families.operator(family, params, 3) @ sources, sources


@pytest.mark.parametrize("family", ["scalar", "rotation", "general"])
def test_fit_recovers_planted_operators(family):
    rng = np.random.default_rng(9)
    params, targets, sources = planted(family, 40, 16, rng, spread=0.3)
    fitted, errors = families.fit(family, targets, sources, 3)
    norms = np.einsum("nuc,nuc->n", targets, targets)
    assert np.sqrt(errors / norms).max() < 1e-5
    np.testing.assert_allclose(
        families.operator(family, fitted, 3), families.operator(family, params, 3), atol=1e-4
    )


def test_affine_fit_recovers_most_planted_maps_and_never_loses_to_the_identity():
    rng = np.random.default_rng(10)
    _, targets, sources = planted("affine", 200, 16, rng, spread=0.25)
    fitted, errors = families.fit("affine", targets, sources, 3)
    norms = np.einsum("nuc,nuc->n", targets, targets)
    relative = np.sqrt(errors / norms)
    assert (relative < 1e-5).mean() >= 0.85, np.percentile(relative, [50, 90])
    start = np.sum((targets - sources) ** 2, axis=(1, 2))
    assert (errors <= start + 1e-9).all()


@pytest.mark.parametrize("family", LEARNED)
def test_fit_errors_are_the_residuals_and_beat_the_identity(family):
    rng = np.random.default_rng(11)
    targets = rng.normal(size=(12, 9, 5))
    sources = rng.normal(size=(12, 9, 5))
    fitted, errors = families.fit(family, targets, sources, 3)
    residual = targets - families.operator(family, fitted, 3) @ sources
    np.testing.assert_allclose(errors, np.sum(residual**2, axis=(1, 2)), rtol=1e-9, atol=1e-9)
    identity_error = np.sum((targets - sources) ** 2, axis=(1, 2))
    assert (errors <= identity_error + 1e-9).all()


def test_scalar_fit_is_the_per_tap_least_squares_formula():
    rng = np.random.default_rng(12)
    targets, sources = rng.normal(size=(3, 9, 6)), rng.normal(size=(3, 9, 6))
    sources[0, 4] = 0.0  # a zero source tap keeps multiplier 1
    fitted, _ = families.fit("scalar", targets, sources, 3)
    expected = np.sum(targets * sources, -1) / np.sum(sources * sources, -1).clip(1e-300)
    expected[0, 4] = 1.0
    np.testing.assert_allclose(fitted, expected, rtol=1e-12)


# ----------------------------------------------------------------------------
# Errors


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"transform_family.*'scalar'.*Received transform_family='spin'"):
        families.check_family("spin")


def test_wrong_parameter_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'affine' family takes 6 parameters"):
        families.operator("affine", np.zeros(5), 3)
