"""Cheap spatial transformations of convolution kernels, as tap tables.

A kernel has shape `(kh, kw, c_in, n)` (Keras layout). Every transform here
acts on the two spatial axes only, identically for every input and base
channel, and is a *partial permutation* of the `kh * kw` taps. It is stored
as an integer table `src` of length `kh * kw`: `src[u]` is the (row-major)
base tap that lands on tap `u`, or `-1` where the transform writes a zero.

That one representation serves the layer's two execution paths, the
composition of transforms, the fitting of assignments and the tests.

The definitions are numpy operations on axes
`(0, 1)`; the tables are obtained by applying exactly those operations to a
grid of tap indices, so the two can never disagree.
"""

import numpy as np

# Each entry: name -> (numpy function on a 2-D (or higher) array's axes 0 and 1,
# whether it needs a square kernel). The fill value for vacated taps is the
# second argument so that the same definition builds tables (fill=-1) and
# transforms kernels (fill=0).


def _shift(array, axis, step, fill):
    """Moves entries one place along `axis` (`step` +1 or -1), filling with `fill`."""
    out = np.full_like(array, fill)
    n = array.shape[axis]
    src = [slice(None)] * array.ndim
    dst = [slice(None)] * array.ndim
    if step > 0:
        src[axis], dst[axis] = slice(0, n - 1), slice(1, n)
    else:
        src[axis], dst[axis] = slice(1, n), slice(0, n - 1)
    out[tuple(dst)] = array[tuple(src)]
    return out


_DEFINITIONS = {
    "identity": (lambda a, fill: a, False),
    "rot90": (lambda a, fill: np.rot90(a, 1, axes=(0, 1)), True),
    "rot180": (lambda a, fill: np.rot90(a, 2, axes=(0, 1)), False),
    "rot270": (lambda a, fill: np.rot90(a, 3, axes=(0, 1)), True),
    "flip_h": (lambda a, fill: np.flip(a, axis=1), False),
    "flip_v": (lambda a, fill: np.flip(a, axis=0), False),
    "transpose": (lambda a, fill: np.swapaxes(a, 0, 1), True),
    "antitranspose": (
        lambda a, fill: np.rot90(np.swapaxes(a, 0, 1), 2, axes=(0, 1)),
        True,
    ),
    "shift_up": (lambda a, fill: _shift(a, 0, -1, fill), False),
    "shift_down": (lambda a, fill: _shift(a, 0, +1, fill), False),
    "shift_left": (lambda a, fill: _shift(a, 1, -1, fill), False),
    "shift_right": (lambda a, fill: _shift(a, 1, +1, fill), False),
}

#: Every transform name, in catalogue order.
TRANSFORM_NAMES = tuple(_DEFINITIONS)

#: Named sets of transforms. Each starts with `identity`, so that with the
#: default assignment the first block of outputs is the base filters.
PRESETS = {
    "d4": (
        "identity",
        "rot90",
        "rot180",
        "rot270",
        "flip_h",
        "flip_v",
        "transpose",
        "antitranspose",
    ),
    "rotations": ("identity", "rot90", "rot180", "rot270"),
    "flips": ("identity", "flip_h", "flip_v", "rot180"),
    "shifts": ("identity", "shift_up", "shift_down", "shift_left", "shift_right"),
    "all": TRANSFORM_NAMES,
}


def needs_square(name):
    """Whether transform `name` is only defined for square kernels."""
    _check_name(name)
    return _DEFINITIONS[name][1]


def _check_name(name):
    if not isinstance(name, str) or name not in _DEFINITIONS:
        raise ValueError(
            f"Unknown transform {name!r}. Valid transform names are "
            f"{list(TRANSFORM_NAMES)}; valid presets are {list(PRESETS)}."
        )


def standardize_kernel_size(kernel_size):
    """`(kh, kw)` from an int or a pair of positive ints; a ValueError otherwise."""
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    kernel_size = tuple(int(k) for k in kernel_size)
    if len(kernel_size) != 2 or min(kernel_size) < 1:
        raise ValueError(
            "Expected kernel_size to be a positive int or a pair of positive "
            f"ints. Received kernel_size={kernel_size}."
        )
    return kernel_size


def resolve_transforms(transforms, kernel_size=None):
    """Turns a preset name, a transform name or a list of names into a tuple.

    Args:
        transforms: a preset (`"d4"`, `"rotations"`, `"flips"`, `"shifts"`,
            `"all"`), one transform name, or a sequence of transform names.
        kernel_size: optional `(kh, kw)` (or int); when given, transforms that
            need a square kernel are rejected for a non-square one.

    Returns:
        A tuple of distinct transform names.

    Raises:
        ValueError: for an unknown name, an empty or repeated list, or a
            rotation/transposition asked of a non-square kernel.
    """
    if isinstance(transforms, str):
        names = PRESETS.get(transforms, (transforms,))
    else:
        try:
            names = tuple(transforms)
        except TypeError:
            raise ValueError(
                "Expected transforms to be a preset name, a transform name or "
                f"a list of transform names. Received transforms={transforms!r}."
            ) from None
    if not names:
        raise ValueError(
            "Expected at least one transform. Received an empty transforms list."
        )
    for name in names:
        _check_name(name)
    if len(set(names)) != len(names):
        raise ValueError(
            f"Expected distinct transform names. Received transforms={list(names)}."
        )
    if kernel_size is not None:
        kh, kw = standardize_kernel_size(kernel_size)
        if kh != kw:
            square_only = [n for n in names if _DEFINITIONS[n][1]]
            if square_only:
                allowed = [n for n in TRANSFORM_NAMES if not _DEFINITIONS[n][1]]
                raise ValueError(
                    f"Transforms {square_only} need a square kernel, but "
                    f"kernel_size={(kh, kw)}. For a non-square kernel the valid "
                    f"transforms are {allowed} (presets 'flips' and 'shifts')."
                )
    return tuple(names)


def degenerate_reason(transforms, kernel_size):
    """Why `transforms` build useless filters on a `kernel_size` kernel ("" when they do not).

    A transform that moves every tap out (a shift along an axis of length 1)
    builds zero filters, and one that gives the same tap table as an
    earlier one (every rotation of a 1x1 kernel, `flip_v` of a 1xk kernel)
    builds copies.

    Args:
        transforms: names or a preset, valid for `kernel_size`
            (`resolve_transforms`).
        kernel_size: int or `(kh, kw)`.
    """
    names = resolve_transforms(transforms, kernel_size)
    kh, kw = standardize_kernel_size(kernel_size)
    grid = np.arange(kh * kw, dtype=np.int32).reshape(kh, kw)
    tables = [np.asarray(_DEFINITIONS[name][0](grid, -1)).reshape(-1) for name in names]
    zero = [name for name, table in zip(names, tables) if (table < 0).all()]
    if zero:
        return (
            f"transforms {zero} move every tap of a {kh}x{kw} kernel out: "
            "their filters would be zero"
        )
    copies = []
    for i, table in enumerate(tables):
        same = next((names[j] for j in range(i) if np.array_equal(tables[j], table)), None)
        if same is not None:
            copies.append(f"{names[i]!r} = {same!r}")
    if copies:
        return (
            f"on a {kh}x{kw} kernel transforms {', '.join(copies)}: their filters "
            "would be copies"
        )
    return ""


def apply_transform(kernel, name):
    """Applies transform `name` to a numpy kernel on its axes (0, 1).

    This is the definition of each transform, written directly with
    numpy: vacated taps of a shift become zero.
    """
    _check_name(name)
    fn, square = _DEFINITIONS[name]
    kernel = np.asarray(kernel)
    if square and kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"Transform {name!r} needs a square kernel; received a kernel with "
            f"spatial shape {kernel.shape[:2]}."
        )
    return np.ascontiguousarray(fn(kernel, 0))


def tap_table(name, kernel_size):
    """The tap table of transform `name` for `kernel_size`.

    Returns:
        An int32 array `src` of length `kh * kw` where `src[u]` is the
        row-major index of the base tap that lands on tap `u`, or -1 where
        the transformed kernel is zero.
    """
    kh, kw = standardize_kernel_size(kernel_size)
    resolve_transforms((name,), (kh, kw))
    grid = np.arange(kh * kw, dtype=np.int32).reshape(kh, kw)
    return np.ascontiguousarray(_DEFINITIONS[name][0](grid, -1)).reshape(-1)


def tap_tables(transforms, kernel_size):
    """Stacks the tap tables of `transforms` (names or a preset): `(T, kh*kw)`."""
    names = resolve_transforms(transforms, kernel_size)
    return np.stack([tap_table(name, kernel_size) for name in names])


def apply_table(kernel, src):
    """Applies a tap table to a numpy kernel `(kh, kw, ...)`."""
    kernel = np.asarray(kernel)
    kh, kw = kernel.shape[:2]
    src = np.asarray(src)
    if src.shape != (kh * kw,):
        raise ValueError(
            f"Expected a tap table of length {kh * kw} for a {kh}x{kw} kernel. "
            f"Received a table of shape {src.shape}."
        )
    flat = kernel.reshape((kh * kw,) + kernel.shape[2:])
    out = np.where(
        (src >= 0).reshape((-1,) + (1,) * (flat.ndim - 1)),
        flat[np.maximum(src, 0)],
        0,
    ).astype(kernel.dtype)
    return out.reshape(kernel.shape)


def compose(first, second, kernel_size):
    """The tap table of `second` applied after `first`.

    `first` and `second` are transform names or tap tables. Composing partial
    permutations gives a partial permutation: a tap is zero if either step
    zeroes it.
    """
    kh, kw = standardize_kernel_size(kernel_size)
    tables = []
    for t in (first, second):
        if isinstance(t, str):
            tables.append(tap_table(t, (kh, kw)))
        else:
            t = np.asarray(t, dtype=np.int32)
            if t.shape != (kh * kw,) or t.min() < -1 or t.max() >= kh * kw:
                raise ValueError(
                    f"Expected a transform name or a tap table of length "
                    f"{kh * kw} with entries in [-1, {kh * kw - 1}]. "
                    f"Received {t.tolist()}."
                )
            tables.append(t)
    a, b = tables
    # (b . a)(B)[u] = a(B)[b[u]] = B[a[b[u]]]
    return np.where(b >= 0, a[np.maximum(b, 0)], -1).astype(np.int32)


def name_of(table, kernel_size, transforms="all"):
    """The name of the transform in `transforms` whose tap table is `table`, or None."""
    kh, kw = standardize_kernel_size(kernel_size)
    table = np.asarray(table)
    for name in resolve_transforms(transforms):
        if _DEFINITIONS[name][1] and kh != kw:
            continue
        if np.array_equal(tap_table(name, (kh, kw)), table):
            return name
    return None
