import numpy as np
import pytest

from tf_transform_conv.ops import transforms as T

from reference import SQUARE_ONLY
from reference import TRANSFORMS as REFERENCE

KERNEL_SIZES = [(1, 1), (3, 3), (5, 5), (2, 3), (3, 5)]


def test_transform_names_and_presets_match_the_reference():
    """The transforms are exactly those of the numpy references, and each preset lists its own."""
    assert set(T.TRANSFORM_NAMES) == set(REFERENCE)
    assert T.PRESETS["d4"] == (
        "identity", "rot90", "rot180", "rot270",
        "flip_h", "flip_v", "transpose", "antitranspose",
    )
    assert T.PRESETS["rotations"] == ("identity", "rot90", "rot180", "rot270")
    assert T.PRESETS["flips"] == ("identity", "flip_h", "flip_v", "rot180")
    assert T.PRESETS["shifts"] == (
        "identity", "shift_up", "shift_down", "shift_left", "shift_right",
    )
    assert set(T.PRESETS["all"]) == set(REFERENCE)


@pytest.mark.parametrize(
    "name, kernel_size",
    [
        (name, size)
        for name in sorted(REFERENCE)
        for size in KERNEL_SIZES
        if size[0] == size[1] or name not in SQUARE_ONLY
    ],
)
def test_tap_table_matches_numpy_definition(name, kernel_size):
    kh, kw = kernel_size
    kernel = np.random.default_rng(0).normal(size=(kh, kw, 3, 2))
    expected = REFERENCE[name](kernel)
    np.testing.assert_array_equal(T.apply_table(kernel, T.tap_table(name, kernel_size)), expected)
    np.testing.assert_array_equal(T.apply_transform(kernel, name), expected)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_tap_table_is_a_partial_permutation(name):
    table = T.tap_table(name, 3)
    kept = table[table >= 0]
    assert len(set(kept.tolist())) == len(kept)
    assert table.dtype == np.int32
    expected_zeros = 3 if name.startswith("shift") else 0
    assert (table < 0).sum() == expected_zeros


def test_shift_table_by_hand():
    # 3x3 taps 0..8 row-major; shift_up moves row 1 to row 0, zero row at the bottom.
    np.testing.assert_array_equal(T.tap_table("shift_up", 3), [3, 4, 5, 6, 7, 8, -1, -1, -1])
    np.testing.assert_array_equal(T.tap_table("shift_right", 3), [-1, 0, 1, -1, 3, 4, -1, 6, 7])
    np.testing.assert_array_equal(T.tap_table("rot90", 3), [2, 5, 8, 1, 4, 7, 0, 3, 6])


@pytest.mark.parametrize("first", sorted(REFERENCE))
@pytest.mark.parametrize("second", sorted(REFERENCE))
def test_compose_applies_first_then_second(first, second):
    kernel = np.random.default_rng(1).normal(size=(3, 3, 2))
    expected = REFERENCE[second](REFERENCE[first](kernel))
    np.testing.assert_array_equal(T.apply_table(kernel, T.compose(first, second, 3)), expected)


def test_compose_names_the_group_product():
    assert T.name_of(T.compose("rot90", "rot90", 3), 3) == "rot180"
    assert T.name_of(T.compose("flip_h", "flip_v", 3), 3) == "rot180"
    assert T.name_of(T.compose("rot90", "rot270", 5), 5) == "identity"
    assert T.name_of(T.compose("shift_up", "shift_down", 3), 3) is None


@pytest.mark.parametrize("preset", sorted(T.PRESETS))
def test_presets_resolve(preset):
    assert T.resolve_transforms(preset, 3) == tuple(T.PRESETS[preset])


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown transform 'spin'.*'rot90'.*presets.*'d4'"):
        T.resolve_transforms(["identity", "spin"])
    with pytest.raises(ValueError, match="Unknown transform"):
        T.tap_table("mirror", 3)


def test_rotation_of_non_square_kernel_is_rejected():
    with pytest.raises(ValueError, match=r"need a square kernel.*kernel_size=\(3, 5\).*'flip_h'"):
        T.resolve_transforms("rotations", (3, 5))
    with pytest.raises(ValueError, match="square"):
        T.tap_table("transpose", (2, 3))
    assert T.resolve_transforms("flips", (3, 5)) == T.PRESETS["flips"]


@pytest.mark.parametrize("kernel_size", [(1, 1), (1, 3), (3, 1), (2, 2), (3, 3), (3, 5), (5, 5)])
@pytest.mark.parametrize("preset", ["rotations", "flips", "shifts", "d4", "all"])
def test_degenerate_transforms_are_exactly_the_zero_or_repeated_kernels(preset, kernel_size):
    try:
        names = T.resolve_transforms(preset, kernel_size)
    except ValueError:
        return  # needs a square kernel
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=kernel_size + (2, 3))
    moved = [T.apply_transform(kernel, n) for n in names]
    zero = any(not m.any() for m in moved)
    repeated = any(np.array_equal(moved[i], moved[j])
                   for i in range(len(moved)) for j in range(i))
    reason = T.degenerate_reason(preset, kernel_size)
    assert bool(reason) == (zero or repeated), reason
    if zero:
        assert "would be zero" in reason
    elif repeated:
        assert "would be copies" in reason


def test_bad_transform_lists():
    with pytest.raises(ValueError, match="at least one transform"):
        T.resolve_transforms([])
    with pytest.raises(ValueError, match="distinct"):
        T.resolve_transforms(["identity", "identity"])
    with pytest.raises(ValueError, match="preset name"):
        T.resolve_transforms(3)
