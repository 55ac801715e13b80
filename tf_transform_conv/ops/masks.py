"""Pruning masks, free of Keras: which weights a magnitude criterion keeps.

The mask arithmetic of unstructured pruning, testable on plain arrays: the
wrappers in `tf_transform_conv.pruning` compute their masks here and apply
them to their variables.
"""

import numpy as np


def magnitude_mask(scores, sparsity):
    """The mask of tfmot's magnitude pruning: the largest `scores` kept to reach `sparsity`.

    Keeps `k = max(round(size * (1 - sparsity)), 1)` entries: every entry
    whose score is at least the `k`-th largest (so ties at the threshold
    are all kept, as in tfmot's `pruning_impl`).

    Args:
        scores: array of non-negative saliencies (`|w|`).
        sparsity: float in [0, 1).

    Returns:
        A float32 array of 0 and 1, shaped like `scores`.

    Example:

    >>> magnitude_mask(np.array([0.1, -3.0, 2.0, 0.5]) ** 2, 0.5)
    array([0., 1., 1., 0.], dtype=float32)
    """
    scores = np.asarray(scores, np.float32)
    k = max(int(np.round(np.float32(scores.size) * np.float32(1.0 - sparsity))), 1)
    k = min(k, scores.size)
    threshold = np.partition(scores.ravel(), scores.size - k)[scores.size - k]
    return (scores >= threshold).astype("float32")


def _same_pool(scores, block, pooling):
    """Pools a matrix's rows (axis 0) in windows of `block`, TF's 'SAME' padding, stride `block`.

    As `tf.nn.pool(..., padding="SAME")` with the window as the stride: the
    padding `ceil(n / block) * block - n` is split, its smaller half before
    the first window; `"AVG"` averages the entries inside the matrix only.
    """
    n = scores.shape[0]
    windows = -(-n // block)
    before = (windows * block - n) // 2
    pooled = np.empty((windows,) + scores.shape[1:], np.float32)
    for i in range(windows):
        rows = scores[max(i * block - before, 0): min((i + 1) * block - before, n)]
        if pooling == "MAX":
            pooled[i] = rows.max(axis=0)
        else:
            pooled[i] = rows.sum(axis=0, dtype=np.float32) / np.float32(rows.shape[0])
    return pooled


def block_magnitude_mask(scores, sparsity, block_size, pooling="AVG"):
    """The mask of tfmot's block sparsity: whole `block_size` blocks of a matrix kept or pruned.

    Each block's score is the average (`"AVG"`) or the largest (`"MAX"`) of
    its entries' scores, pooled first over rows, then over columns, with the
    windows placed as TensorFlow's `"SAME"` pooling places them; the blocks
    are then kept as `magnitude_mask` keeps entries (`max(round(blocks *
    (1 - sparsity)), 1)` of them, ties at the threshold kept), and each kept
    block score keeps the `block_size` entries starting at row `i * bh`,
    column `j * bw` (as tfmot expands its block mask: where the matrix is
    not a multiple of the block, the last blocks are cut, and pooling windows
    and mask blocks can be offset by the padding, as in tfmot).

    Args:
        scores: 2-D array of non-negative saliencies (`|w|`).
        sparsity: float in [0, 1), the fraction of blocks pruned.
        block_size: `(bh, bw)`, positive ints.
        pooling: `"AVG"` or `"MAX"`.

    Returns:
        A float32 array of 0 and 1, shaped like `scores`.

    Example:

    >>> w = np.array([[1., 1., 0., 0.], [1., 1., 0., 0.1]])
    >>> block_magnitude_mask(np.abs(w), 0.5, (2, 2))
    array([[1., 1., 0., 0.],
           [1., 1., 0., 0.]], dtype=float32)
    """
    scores = np.asarray(scores, np.float32)
    bh, bw = block_size
    pooled = _same_pool(_same_pool(scores, bh, pooling).T, bw, pooling).T
    kept = magnitude_mask(pooled, sparsity)
    expanded = np.repeat(np.repeat(kept, bh, axis=0), bw, axis=1)
    return np.ascontiguousarray(expanded[: scores.shape[0], : scores.shape[1]])


def _m_by_n_rows(weights):
    """The matrix tfmot's M-by-N pattern runs along (its rows): TFLite's weight layout.

    A 2-D kernel `(in, out)` as `(out, in)`; a 4-D kernel `(kh, kw, in, out)`
    as `(out * kh * kw, in)`: consecutive input channels of one output.
    """
    if weights.ndim == 2:
        return weights.T
    if weights.ndim == 4:
        return np.transpose(weights, (3, 0, 1, 2)).reshape(-1, weights.shape[2])
    raise ValueError(
        f"M-by-N sparsity takes a 2-D or 4-D kernel. Received a kernel of shape "
        f"{weights.shape}."
    )


def _from_m_by_n_rows(rows, shape):
    if len(shape) == 2:
        return rows.T
    return np.transpose(rows.reshape(shape[3], shape[0], shape[1], shape[2]), (1, 2, 3, 0))


def m_by_n_mask(scores, m_by_n):
    """The mask of tfmot's M-by-N sparsity: `m` zeros in every `n` consecutive weights.

    The weights run in TFLite's layout (`_m_by_n_rows`: input channels
    innermost); along each row, every group of `n` consecutive entries
    keeps its `n - m` largest scores (of equal scores, the first), the last
    group of a row that `n` does not divide counting only its own entries.

    Args:
        scores: 2-D `(in, out)` or 4-D `(kh, kw, in, out)` array of
            non-negative saliencies (`|w|`).
        m_by_n: `(m, n)`, ints with `0 <= m < n`.

    Returns:
        A float32 array of 0 and 1, shaped like `scores`.

    Example:

    >>> m_by_n_mask(np.array([[0.1], [0.4], [0.3], [0.2]]), (2, 4)).ravel()
    array([0., 1., 1., 0.], dtype=float32)
    """
    scores = np.asarray(scores, np.float32)
    m, n = m_by_n
    rows = _m_by_n_rows(scores)
    width = rows.shape[1]
    padded = np.zeros((rows.shape[0], width + n - width % n), np.float32)
    padded[:, :width] = rows
    groups = padded.reshape(-1, n)
    # A stable sort of -score: the largest first, equal ones in index order.
    order = np.argsort(-groups, axis=1, kind="stable")[:, : n - m]
    mask = np.zeros_like(groups)
    np.put_along_axis(mask, order, 1.0, axis=1)
    mask = mask.reshape(padded.shape)[:, :width]
    return np.ascontiguousarray(_from_m_by_n_rows(mask, scores.shape)).astype("float32")
