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
