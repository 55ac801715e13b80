"""Re-estimating batch-norm statistics after filters are rebuilt.

A reconstructed filter is close to the filter it replaces, not equal to it:
its layer's outputs shift, and the moving mean and variance of the batch norm
after it no longer match them. Re-estimating those statistics from a few
batches of training data (adaptive batch norm, Li et al., "EagleEye", ECCV
2020) restores much of a one-shot conversion's accuracy before any
fine-tuning, at the cost of a few forward passes.
"""

import keras

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._data import batches


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
