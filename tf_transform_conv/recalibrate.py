"""Re-estimating batch-norm statistics after filters are rebuilt.

A reconstructed filter is close to the filter it replaces, not equal to it:
its layer's outputs shift, and the moving mean and variance of the batch norm
after it no longer match them. Re-estimating those statistics from a few
batches of training data (adaptive batch norm, Li et al., "EagleEye", ECCV
2020) restores much of a one-shot conversion's accuracy before any
fine-tuning, at the cost of a few forward passes.
"""

import numpy as np
import keras

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_positive_int


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


def recalibrate_batch_norm(model, data, num_batches=20, batch_size=32):
    """Re-estimates the moving statistics of every `BatchNormalization` layer of `model`.

    Runs `num_batches` forward passes in training mode, with each batch norm's
    momentum set so that its moving mean and variance become the plain
    average of the batches' statistics (batch `i` weighs `1 / (i + 1)`), then
    restores the momenta. Nothing else changes: no weights are trained
    (layers that act differently in training mode, such as dropout, only
    affect the statistics the way they do in training). `TransformPruning`
    wrappers run their current effective kernels.

    Args:
        model: a Keras model.
        data: training inputs, as `batches` takes them.
        num_batches: int >= 1, the batches to average over. Defaults to 20.
        batch_size: int, for array data. Defaults to 32.

    Returns:
        The number of batch-norm layers re-estimated.

    Raises:
        ValueError: if `num_batches` is not a positive int or `data` yields no batch.

    Example:

    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3),
    ...                           keras.layers.BatchNormalization()])
    >>> recalibrate_batch_norm(model, np.ones((8, 4, 4, 1), "float32"), num_batches=2)
    1
    """
    check_positive_int(num_batches, "num_batches", expected="a positive int")
    layers = _compat.layers_of(model)
    norms = [l for l in layers if isinstance(l, keras.layers.BatchNormalization)]
    if not norms:
        return 0
    # Pruning wrappers refuse training-mode calls outside their step
    # callback; these forward passes skip no pruning step.
    wrappers = [l for l in layers if hasattr(l, "step_callback_attached")]
    momenta = [bn.momentum for bn in norms]
    attached = [w.step_callback_attached for w in wrappers]
    seen = 0
    try:
        for wrapper in wrappers:
            wrapper.step_callback_attached = True
        for seen, batch in enumerate(batches(data, num_batches, batch_size), start=1):
            for bn in norms:
                bn.momentum = (seen - 1) / seen
            model(batch, training=True)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        for wrapper, value in zip(wrappers, attached):
            wrapper.step_callback_attached = value
    if not seen:
        raise ValueError("recalibrate_batch_norm: `data` yielded no batch.")
    return len(norms)
