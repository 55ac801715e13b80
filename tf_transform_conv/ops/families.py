"""Transform families: learned operators on a base filter's taps.

Flatten a base filter's `taps = kh * kw` spatial entries (row-major, Keras
layout). Every transform in this package is a `taps x taps` matrix `S`
acting on them, the same for every input channel:

    W[:, :, c, o] = reshape(S_o @ B[:, :, c, b(o)].reshape(taps))

A *family* says how `S_o` is built. Each one refines the discrete transform
`t(o)` of the layer's assignment (a partial permutation `Pi_t` of the taps,
`tf_transform_conv.ops.transforms`) with a learned operator `L`:

    S_o = L(phi_o) @ Pi_t(o)

| family | `L(phi)` | `phi` (per transformed filter) | nonzeros per row |
|---|---|---|---|
| `"discrete"` | the identity | nothing | <= 1 |
| `"scalar"` | `diag(m)`: a multiplier per tap | `m`, `taps` values | <= 1 |
| `"rotation"` | `a` times bilinear sampling at `R(theta) u` | `(theta, a)` | <= 4 |
| `"affine"` | bilinear sampling at `A [u; 1]` | `A`, a 2x3 matrix (6 values) | <= 4 |
| `"general"` | any matrix `M` | `M`, `taps * taps` values | `taps` |

At `identity_params(family)` (multipliers 1, angle 0 and amplitude 1, the
identity matrix) `L` is exactly the identity, so `S_o = Pi_t(o)`: a layer
that switches from the discrete family to a learned one keeps its outputs,
and training moves each filter away from its discrete transform.

Coordinates: tap `(i, j)` sits at `u = (j - (kw - 1) / 2, i - (kh - 1) / 2)`
(x to the right, y down). Bilinear sampling at a point `p` interpolates the
base's taps at `p`, the base being zero outside its `kh x kw` grid: a point
half a tap beyond the last column takes half of that column. With these
conventions the rotation at `theta = pi / 2` is `np.rot90(B, 1, axes=(0, 1))`,
and the affine maps of `affine_matrix(name)` reproduce every discrete
transform of `tf_transform_conv.ops.transforms` exactly (`flip_h` is
`[[-1, 0, 0], [0, 1, 0]]`, `shift_right` is `[[1, 0, -1], [0, 1, 0]]`, ...).
The interpolation weights use `floor`, so at a tap centre (where training
starts) the derivative in the angle or matrix is the one-sided derivative
towards the next tap, never zero.

Two versions of every operator: `operator` (numpy, float64: the definition,
used by the tests and the fitting) and `operators` (`keras.ops`: what the
layer differentiates through).
"""

import math

import numpy as np
from keras import ops

from tf_transform_conv.ops import transforms as transforms_lib

#: The transform families, in order of expressiveness.
FAMILIES = ("discrete", "scalar", "rotation", "affine", "general")

#: Families whose operator samples the base bilinearly.
SAMPLED = ("rotation", "affine")

# The affine maps (2x3, acting on [x; y; 1] of the output tap) that sample a
# base at the point each discrete transform reads from.
_AFFINE = {
    "identity": ((1, 0, 0), (0, 1, 0)),
    "rot90": ((0, -1, 0), (1, 0, 0)),
    "rot180": ((-1, 0, 0), (0, -1, 0)),
    "rot270": ((0, 1, 0), (-1, 0, 0)),
    "flip_h": ((-1, 0, 0), (0, 1, 0)),
    "flip_v": ((1, 0, 0), (0, -1, 0)),
    "transpose": ((0, 1, 0), (1, 0, 0)),
    "antitranspose": ((0, -1, 0), (-1, 0, 0)),
    "shift_up": ((1, 0, 0), (0, 1, 1)),
    "shift_down": ((1, 0, 0), (0, 1, -1)),
    "shift_left": ((1, 0, 1), (0, 1, 0)),
    "shift_right": ((1, 0, -1), (0, 1, 0)),
}
_ANGLES = {"identity": 0.0, "rot90": math.pi / 2, "rot180": math.pi, "rot270": 3 * math.pi / 2}


def check_family(family):
    """Returns `family` if it names a family, else raises a ValueError listing them."""
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(
            "Invalid value for argument `transform_family`. Expected one of "
            f"{list(FAMILIES)}. Received transform_family={family!r}."
        )
    return family


def num_params(family, kernel_size):
    """Learned values per transformed filter: 0, `taps`, 2, 6 or `taps**2`."""
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    taps = kh * kw
    return {"discrete": 0, "scalar": taps, "rotation": 2, "affine": 6, "general": taps * taps}[
        check_family(family)
    ]


def identity_params(family, kernel_size):
    """The parameters at which `L` is the identity (float32, shape `(num_params,)`)."""
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    taps = kh * kw
    values = {
        "discrete": np.zeros(0),
        "scalar": np.ones(taps),
        "rotation": np.array([0.0, 1.0]),
        "affine": np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        "general": np.eye(taps).reshape(-1),
    }[check_family(family)]
    return values.astype(np.float32)


def affine_matrix(name):
    """The 2x3 affine map that samples a base where discrete transform `name` reads it.

    Bilinear sampling with this matrix reproduces `transforms.apply_transform(B,
    name)` exactly (shifts are translations by one tap).
    """
    transforms_lib.resolve_transforms((name,))
    return np.array(_AFFINE[name], np.float64)


def rotation_angle(name):
    """The angle `theta` whose rotation reproduces discrete transform `name`, or None."""
    transforms_lib.resolve_transforms((name,))
    return _ANGLES.get(name)


def tap_coordinates(kernel_size):
    """`(x, y)` of every tap, row-major, centred: float64 arrays of length `taps`."""
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    i, j = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    return (j.reshape(-1) - (kw - 1) / 2.0), (i.reshape(-1) - (kh - 1) / 2.0)


def permutation_matrix(table):
    """`Pi` of a tap table: `Pi[u, src[u]] = 1` (a zero row where `src[u] = -1`)."""
    table = np.asarray(table)
    taps = len(table)
    matrix = np.zeros((taps, taps))
    rows = np.flatnonzero(table >= 0)
    matrix[rows, table[rows]] = 1.0
    return matrix


# ----------------------------------------------------------------------------
# numpy: the definitions


def _check_params(family, params, kernel_size):
    params = np.asarray(params, np.float64)
    count = num_params(family, kernel_size)
    if params.shape[-1:] != (count,) and not (count == 0 and params.shape[-1:] == (0,)):
        raise ValueError(
            f"The {family!r} family takes {count} parameters per filter for a "
            f"{kernel_size} kernel. Received parameters of shape {params.shape}."
        )
    return params


def sampling_operator(matrix, kernel_size):
    """numpy: `(..., taps, taps)` bilinear sampling of the taps at `A [u; 1]`.

    Args:
        matrix: array `(..., 2, 3)` of affine maps.
        kernel_size: int or `(kh, kw)`.
    """
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    taps = kh * kw
    matrix = np.asarray(matrix, np.float64)
    x, y = tap_coordinates((kh, kw))
    gx = matrix[..., 0, :1] * x + matrix[..., 0, 1:2] * y + matrix[..., 0, 2:] + (kw - 1) / 2
    gy = matrix[..., 1, :1] * x + matrix[..., 1, 1:2] * y + matrix[..., 1, 2:] + (kh - 1) / 2
    x0, y0 = np.floor(gx), np.floor(gy)
    fx, fy = gx - x0, gy - y0
    out = np.zeros(matrix.shape[:-2] + (taps, taps))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            col, row = x0 + dx, y0 + dy
            valid = (col >= 0) & (col <= kw - 1) & (row >= 0) & (row <= kh - 1)
            index = (np.clip(row, 0, kh - 1) * kw + np.clip(col, 0, kw - 1)).astype(np.int64)
            out += np.eye(taps)[index] * np.where(valid, wx * wy, 0.0)[..., None]
    return out


def rotation_matrix(theta):
    """numpy: the 2x3 affine maps `[R(theta) | 0]` for an array of angles."""
    theta = np.asarray(theta, np.float64)
    c, s = np.cos(theta), np.sin(theta)
    zero = np.zeros_like(theta)
    return np.stack([np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1)], -2)


def operator(family, params, kernel_size):
    """numpy: the learned operator `L(params)`, `(..., taps, taps)` float64.

    Args:
        family: one of `FAMILIES`.
        params: array `(..., num_params(family, kernel_size))`.
        kernel_size: int or `(kh, kw)`.
    """
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    taps = kh * kw
    params = _check_params(family, params, (kh, kw))
    batch = params.shape[:-1]
    if family == "discrete":
        return np.broadcast_to(np.eye(taps), batch + (taps, taps)).copy()
    if family == "scalar":
        return params[..., :, None] * np.eye(taps)
    if family == "rotation":
        return params[..., 1, None, None] * sampling_operator(rotation_matrix(params[..., 0]), (kh, kw))
    if family == "affine":
        return sampling_operator(params.reshape(batch + (2, 3)), (kh, kw))
    return params.reshape(batch + (taps, taps))


def transform_operator(family, params, table, kernel_size):
    """numpy: the whole tap operator `S = L(params) @ Pi_table`, `(..., taps, taps)`."""
    return operator(family, params, kernel_size) @ permutation_matrix(table)


def apply_operator(kernel, matrix):
    """numpy: applies a `(taps, taps)` operator to a kernel `(kh, kw, ...)` on its taps."""
    kernel = np.asarray(kernel)
    kh, kw = kernel.shape[:2]
    flat = kernel.reshape((kh * kw, -1))
    return (np.asarray(matrix) @ flat).reshape(kernel.shape)


# ----------------------------------------------------------------------------
# keras.ops: what the layer differentiates through


def operators(family, params, kernel_size):
    """keras.ops: `L(params)` for a batch of parameters, `(..., taps, taps)`.

    Differentiable in `params` (the bilinear weights through `floor`, see the
    module docstring). The discrete family has no parameters and no operator:
    the layer never calls this for it.
    """
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    taps = kh * kw
    check_family(family)
    if family == "discrete":
        raise ValueError("The discrete family has no learned operator.")
    if family == "scalar":
        return params[..., :, None] * ops.cast(np.eye(taps), params.dtype)
    if family == "general":
        return ops.reshape(params, tuple(ops.shape(params)[:-1]) + (taps, taps))
    if family == "rotation":
        theta, amplitude = params[..., 0], params[..., 1]
        c, s = ops.cos(theta), ops.sin(theta)
        zero = ops.zeros_like(theta)
        rows = (ops.stack([c, -s, zero], -1), ops.stack([s, c, zero], -1))
        return amplitude[..., None, None] * _sampling_operators(rows, (kh, kw))
    rows = (params[..., 0:3], params[..., 3:6])
    return _sampling_operators(rows, (kh, kw))


def _sampling_operators(rows, kernel_size):
    """keras.ops version of `sampling_operator`; `rows` are the two rows of `A`, `(..., 3)`."""
    kh, kw = kernel_size
    taps = kh * kw
    dtype = rows[0].dtype
    x, y = (ops.cast(v, dtype) for v in tap_coordinates((kh, kw)))

    def mapped(row, centre):
        return row[..., 0:1] * x + row[..., 1:2] * y + row[..., 2:3] + centre

    gx, gy = mapped(rows[0], (kw - 1) / 2), mapped(rows[1], (kh - 1) / 2)
    x0, y0 = ops.floor(gx), ops.floor(gy)
    fx, fy = gx - x0, gy - y0
    total = None
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            col, row = x0 + dx, y0 + dy
            valid = (col >= 0) & (col <= kw - 1) & (row >= 0) & (row <= kh - 1)
            index = ops.cast(
                ops.clip(row, 0, kh - 1) * kw + ops.clip(col, 0, kw - 1), "int32"
            )
            weight = ops.where(valid, wx * wy, ops.zeros_like(wx))
            term = ops.one_hot(index, taps, dtype=dtype) * weight[..., None]
            total = term if total is None else total + term
    return total


# ----------------------------------------------------------------------------
# numpy: least-squares fits

# The rotation fit starts from the best of these angles (then refines).
_ANGLE_GRID = np.linspace(-np.pi, np.pi, 72, endpoint=False)
# Levenberg-Marquardt iterations for the rotation and affine fits.
_FIT_ITERATIONS = 25
_FIT_STEP = 1e-5  # central differences of the sampling operator
_AFFINE_RANDOM_STARTS = 6
_AFFINE_START_SPREAD = 0.3
# The general fit's ridge, relative to the mean diagonal of the source Gram:
# it keeps the fit near the identity where the source spans too few
# directions (fewer channels than taps) to determine the matrix.
_GENERAL_RIDGE = 1e-6


def fit(family, targets, sources, kernel_size, starts=None):
    """numpy: least-squares parameters with `L(params) @ source ~ target`, per row.

    Minimises `||target - L(params) @ source||_F^2` over the family's
    parameters (`operator`), independently for every row:

    - `"scalar"`: per tap, `m_u = <target_u, source_u> / ||source_u||^2`
      (1 where the source tap is zero);
    - `"general"`: `M = T S^T (S S^T)^-1`, with a tiny ridge towards the
      identity where `S S^T` is singular;
    - `"rotation"`: the best angle on a 5-degree grid over the circle (the
      amplitude in closed form), refined by Levenberg-Marquardt;
    - `"affine"`: Levenberg-Marquardt from the identity and from the best
      rotation, the better kept;
    - `"discrete"`: no parameters.

    Args:
        family: one of `FAMILIES`.
        targets: array `(N, taps, c)`, the filters to reproduce, taps
            row-major.
        sources: array `(N, taps, c)`, the (discretely transformed) bases
            they are built from, taps row-major.
        kernel_size: int or `(kh, kw)`.
        starts: optional `(N, num_params)`, one more starting point per row
            for the iterative fits (rotation, affine), e.g. the parameters of
            a discrete transform the operator should absorb.

    Returns:
        `(params, errors)`: float64 `(N, num_params)` and the squared
        residuals `(N,)`.
    """
    targets = np.asarray(targets, np.float64)
    sources = np.asarray(sources, np.float64)
    cross = np.einsum("nuc,nvc->nuv", targets, sources)  # T S^T
    gram = np.einsum("nuc,nvc->nuv", sources, sources)  # S S^T
    norms = np.einsum("nuc,nuc->n", targets, targets)
    return fit_from_moments(family, cross, gram, norms, kernel_size, starts)


def fit_from_moments(family, cross, gram, norms, kernel_size, starts=None):
    """`fit` from the moments `T S^T`, `S S^T` `(N, taps, taps)` and `||T||^2` `(N,)`.

    `||T - L S||^2 = ||T||^2 - 2 <L, T S^T> + <L S S^T, L>`: every family
    fits on these `taps x taps` moments, whatever the number of channels.
    """
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    taps = kh * kw
    check_family(family)
    count = len(norms)
    if family == "discrete":
        params = np.zeros((count, 0))
    elif family == "scalar":
        diag_c = np.einsum("nuu->nu", cross)
        diag_g = np.einsum("nuu->nu", gram)
        params = np.where(diag_g > 0, diag_c / np.where(diag_g > 0, diag_g, 1.0), 1.0)
    elif family == "general":
        ridge = _GENERAL_RIDGE * np.maximum(np.einsum("nuu->n", gram) / taps, 1e-300)
        eye = np.eye(taps)
        regular = gram + ridge[:, None, None] * eye
        # L = I + (C - G)(G + r I)^-1: the least-squares solution, pulled to
        # the identity in the directions the source does not span.
        delta = np.linalg.solve(regular, np.swapaxes(cross - gram, 1, 2))
        params = (eye + np.swapaxes(delta, 1, 2)).reshape(count, taps * taps)
    elif family == "rotation":
        params = _fit_rotation(cross, gram, norms, (kh, kw))
    else:
        params = _fit_affine(cross, gram, norms, (kh, kw), starts)
    if starts is not None and family == "rotation":
        refined = _levenberg_marquardt(family, np.asarray(starts, np.float64), cross, gram,
                                       norms, (kh, kw))
        better = (_fit_errors(family, refined, cross, gram, norms, (kh, kw))
                  < _fit_errors(family, params, cross, gram, norms, (kh, kw)))
        params = np.where(better[:, None], refined, params)
    return params, _fit_errors(family, params, cross, gram, norms, (kh, kw))


def absorbed_transforms(family, kernel_size):
    """The discrete transforms that `family`'s operator reproduces exactly (names)."""
    kh, kw = transforms_lib.standardize_kernel_size(kernel_size)
    check_family(family)
    if family == "rotation":
        names = ("identity", "rot90", "rot180", "rot270") if kh == kw else ("identity", "rot180")
    elif family in ("affine", "general"):
        names = transforms_lib.TRANSFORM_NAMES
    else:
        names = ("identity",)
    return tuple(n for n in names if kh == kw or not transforms_lib.needs_square(n))


def absorbed_params(family, name, kernel_size):
    """The family parameters whose operator is discrete transform `name` (see `absorbed_transforms`)."""
    if name not in absorbed_transforms(family, kernel_size):
        raise ValueError(f"The {family!r} family does not reproduce transform {name!r}.")
    if family == "rotation":
        return np.array([rotation_angle(name), 1.0])
    if family == "affine":
        return affine_matrix(name).reshape(-1)
    if family == "general":
        table = transforms_lib.tap_table(name, kernel_size)
        return permutation_matrix(table).reshape(-1)
    return identity_params(family, kernel_size).astype(np.float64)


def _fit_affine(cross, gram, norms, kernel_size, extra=None):
    """Levenberg-Marquardt from several starts, all rows at once; the best kept.

    The error is not convex in the matrix (bilinear sampling is piecewise
    linear in the sampled point), so one start often stops in a local
    minimum: the identity, the best rotation and `_AFFINE_RANDOM_STARTS`
    seeded perturbations of the identity are refined together.
    """
    count = len(norms)
    identity = identity_params("affine", kernel_size).astype(np.float64)
    rotated = _fit_rotation(cross, gram, norms, kernel_size)
    rng = np.random.default_rng(0)
    starts = [np.tile(identity, (count, 1)), rotation_matrix(rotated[:, 0]).reshape(count, 6)]
    starts += [
        identity + rng.normal(scale=_AFFINE_START_SPREAD, size=(count, 6))
        for _ in range(_AFFINE_RANDOM_STARTS)
    ]
    if extra is not None:
        starts.append(np.asarray(extra, np.float64))
    k = len(starts)
    tile = lambda a: np.concatenate([a] * k)  # noqa: E731
    fitted = _levenberg_marquardt(
        "affine", np.concatenate(starts), tile(cross), tile(gram), tile(norms), kernel_size
    )
    errors = _fit_errors("affine", fitted, tile(cross), tile(gram), tile(norms), kernel_size)
    best = np.argmin(errors.reshape(k, count), axis=0)
    return fitted.reshape(k, count, 6)[best, np.arange(count)]


def _fit_errors(family, params, cross, gram, norms, kernel_size):
    matrix = operator(family, params, kernel_size)
    value = (
        norms
        - 2 * np.einsum("nuv,nuv->n", matrix, cross)
        + np.einsum("nuw,nwv,nuv->n", matrix, gram, matrix)
    )
    return np.maximum(value, 0.0)


def _fit_rotation(cross, gram, norms, kernel_size):
    """The angle on `_ANGLE_GRID` with the best amplitude, then refined."""
    best, best_error = None, None
    for theta in _ANGLE_GRID:
        matrix = sampling_operator(rotation_matrix(theta), kernel_size)
        num = np.einsum("uv,nuv->n", matrix, cross)
        den = np.einsum("uw,nwv,uv->n", matrix, gram, matrix)
        amplitude = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        params = np.stack([np.full_like(amplitude, theta), amplitude], -1)
        error = _fit_errors("rotation", params, cross, gram, norms, kernel_size)
        if best is None:
            best, best_error = params, error
        else:
            better = error < best_error
            best = np.where(better[:, None], params, best)
            best_error = np.where(better, error, best_error)
    return _levenberg_marquardt("rotation", best, cross, gram, norms, kernel_size)


def _levenberg_marquardt(family, params, cross, gram, norms, kernel_size):
    """Refines `params` `(N, p)`; a step is kept only where it lowers the error."""
    params = params.copy()
    count, size = params.shape
    error = _fit_errors(family, params, cross, gram, norms, kernel_size)
    damping = np.full(count, 1e-3)
    eye = np.eye(size)
    for _ in range(_FIT_ITERATIONS):
        matrix = operator(family, params, kernel_size)
        derivatives = []
        for p in range(size):
            step = np.zeros(size)
            step[p] = _FIT_STEP
            derivatives.append(
                (operator(family, params + step, kernel_size)
                 - operator(family, params - step, kernel_size)) / (2 * _FIT_STEP)
            )
        derivatives = np.stack(derivatives, 1)  # (N, p, taps, taps)
        residual = cross - matrix @ gram  # gradient side: <dL, C - L G>
        gradient = np.einsum("npuv,nuv->np", derivatives, residual)
        hessian = np.einsum("npuw,nwv,nquv->npq", derivatives, gram, derivatives)
        diagonal = np.einsum("npp->np", hessian)
        system = hessian + (damping[:, None] * np.maximum(diagonal, 1e-12))[:, :, None] * eye
        try:
            update = np.linalg.solve(system, gradient[..., None])[..., 0]
        except np.linalg.LinAlgError:
            update = np.linalg.lstsq(system.reshape(-1, size), gradient.reshape(-1), rcond=None)[0]
        trial = params + update
        trial_error = _fit_errors(family, trial, cross, gram, norms, kernel_size)
        better = trial_error < error
        params = np.where(better[:, None], trial, params)
        error = np.where(better, trial_error, error)
        damping = np.where(better, damping / 3, damping * 4)
    return params


def coefficient_kind(family):
    """How a family's operators enter the engines: None, `"diagonal"` or `"dense"`."""
    check_family(family)
    if family == "discrete":
        return None
    return "diagonal" if family == "scalar" else "dense"


def coefficients(family, params, kernel_size):
    """keras.ops: the family's operators as the engines use them, filters last.

    For parameters `(g, f, p)` (depth groups, filters): None for the
    discrete family; the multipliers `(g, taps, f)` for the scalar family
    (`L = diag(params)`); the operators `L` as `(g, taps_u, taps_w, f)`
    otherwise. Filters last, so each term of the factored sums multiplies a
    slice of outputs by a contiguous vector.
    """
    kind = coefficient_kind(family)
    if kind is None:
        return None
    if kind == "dense":
        params = operators(family, params, kernel_size)
    return ops.moveaxis(params, 1, -1)


def apply_coefficients(moved, coefficients_, family):
    """keras.ops: `L @` each discretely moved filter, tap-major `(taps, g, f, c)`.

    `moved[w, k, o]` is tap `w` of `T_t(B[..., b(o)])` in group `k`;
    `coefficients_` as `coefficients` returns them. Returns the taps of
    `L_{k,o} @ T_t(B)`, the same layout.
    """
    kind = coefficient_kind(family)
    if kind is None:
        return moved
    if kind == "diagonal":
        return moved * ops.transpose(coefficients_, (1, 0, 2))[..., None]
    return ops.einsum("guwf,wgfc->ugfc", coefficients_, moved)


def materialize(base, index, coefficients_, family, scale, filters, depth_groups):
    """keras.ops: the equivalent `Conv2D` kernel `(kh, kw, c_in, filters)`.

    One gather of the base taps through the discrete transforms (`index`,
    `layout.IndexTables.materialize`: rows of the `(taps * g * n + 1, c/g)`
    table of base taps, the last row zero), then the learned operators
    (`apply_coefficients`) and the per-output scale.
    """
    kh, kw, channels, n = base.shape
    taps, g = kh * kw, depth_groups
    cg = channels // g
    table = ops.reshape(base, (taps, g, cg, n))
    table = ops.reshape(ops.transpose(table, (0, 1, 3, 2)), (taps * g * n, cg))
    table = ops.concatenate([table, ops.zeros((1, cg), base.dtype)], axis=0)
    kernel = ops.take(table, index, axis=0)  # (taps, g, f, cg)
    kernel = apply_coefficients(kernel, coefficients_, family)
    kernel = ops.reshape(ops.transpose(kernel, (0, 1, 3, 2)), (kh, kw, channels, filters))
    if scale is not None:
        kernel = kernel * scale
    return kernel
