"""Filter bases: every `kh x kw` filter as a combination of `kh * kw` basis filters.

`dct_basis` gives the orthonormal 2-D DCT-II basis, `initial_basis` the
standard (one-hot) or DCT basis a filter-basis layer starts from, and
`combine_basis` the filters `sum_j C[j, c, o] * F_j` from a basis `F` and
coefficients `C` (with `keras.ops`, so it runs inside layers on every
backend). Used by interspace pruning and the filter-basis layers.
"""

import numpy as np
from keras import ops

__all__ = ["BASES", "combine_basis", "dct_basis", "initial_basis"]

#: The filter bases a filter-basis layer can start from.
BASES = ("standard", "dct")


def dct_basis(kernel_size):
    """The orthonormal 2-D DCT-II basis of `kh x kw` filters, `(kh * kw, kh * kw)`.

    Row `j` is basis filter `F_j` flattened in row-major `(h, w)` order;
    rows are orthonormal, so `C = F @ w` and `w = F.T @ C` for a flattened
    filter `w`.

    Example:

    >>> f = dct_basis((3, 3))
    >>> bool(np.allclose(f @ f.T, np.eye(9), atol=1e-6))
    True
    """
    def one(n):
        k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
        d[0] /= np.sqrt(2.0)
        return d

    kh, kw = kernel_size
    return np.kron(one(kh), one(kw)).astype("float32")


def initial_basis(basis, kernel_size):
    """The `(kh * kw, kh * kw)` basis named `basis`: `"standard"` (one-hot filters) or `"dct"`."""
    taps = kernel_size[0] * kernel_size[1]
    return np.eye(taps, dtype="float32") if basis == "standard" else dct_basis(kernel_size)


def combine_basis(basis, coefficients, dtype):
    """`sum_j C[j, c, o] * F_j` per basis group: the filters, `(kh, kw, c_in, n)`.

    Args:
        basis: `(groups, kh * kw, kh * kw)`, row `j` of group `g` the basis
            filter `F_j` of the `g`-th contiguous group of input channels,
            flattened in row-major `(h, w)` order.
        coefficients: `(kh, kw, c_in, n)`, read as `C = reshape(...,
            (kh * kw, c_in, n))`.
        dtype: the dtype to compute in.
    """
    kh, kw, channels, filters = coefficients.shape
    g = basis.shape[0]
    c = ops.reshape(ops.cast(coefficients, dtype), (kh * kw, g, channels // g, filters))
    w = ops.einsum("gjt,jgco->tgco", ops.cast(basis, dtype), c)
    return ops.reshape(w, (kh, kw, channels, filters))
