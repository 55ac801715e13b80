"""Reading a few batches from whatever data a user passes (arrays, `(x, y)`, datasets, iterables).

Shared by batch-norm recalibration and the gradient saliencies, which both
take "a few batches of training data" in any of the forms Keras's `fit`
accepts.
"""

import numpy as np


def batches(data, count, batch_size=32, labelled=False):
    """The first `count` batches of `data` (arrays, `(x, y)`, a dataset or batches).

    Args:
        data: an array of inputs (split into `batch_size` batches), a tuple
            `(x, y)` of arrays, a `tf.data.Dataset`, or any iterable of
            batches `x` or `(x, y, ...)`.
        count: int, how many batches.
        batch_size: int, for array data.
        labelled: yield `(x, y)` pairs (the data must carry labels) instead
            of the inputs alone.

    Yields:
        Input batches, or `(x, y)` batches with `labelled`.

    Raises:
        ValueError: with `labelled`, for data without labels.
    """
    unlabelled = (
        f"labelled batches (x, y) are needed; the data holds {type(data).__name__} "
        "inputs alone"
    )
    if isinstance(data, tuple) and data and hasattr(data[0], "shape"):
        arrays = [np.asarray(a) for a in data[:2 if labelled else 1]]
    elif hasattr(data, "shape") and not hasattr(data, "element_spec"):
        arrays = [np.asarray(data)]
    else:
        arrays = None
    if arrays is not None:
        if labelled and len(arrays) < 2:
            raise ValueError(unlabelled)
        for start in range(0, min(len(arrays[0]), count * batch_size), batch_size):
            window = [a[start:start + batch_size] for a in arrays]
            yield tuple(window) if labelled else window[0]
        return
    for index, batch in enumerate(data):
        if index >= count:
            return
        paired = isinstance(batch, (tuple, list))
        if not labelled:
            yield batch[0] if paired else batch
        elif paired and len(batch) >= 2:
            yield batch[0], batch[1]
        else:
            raise ValueError(
                "labelled batches (x, y) are needed; the data yielded "
                f"{type(batch).__name__}."
            )
