"""`ChannelPad`: zero channels before and after the input's (the "option A" shortcut of CIFAR ResNets)."""

import keras
from keras import ops

from tf_transform_conv._checks import is_int


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class ChannelPad(keras.layers.Layer):
    """Zero-pads the channel axis of a 4D tensor.

    The channel half of the "option A" shortcut of He et al. (2016): the
    identity shortcut gains zero channels where a stage widens. Keras has
    padding layers for the spatial axes only.

    Args:
        padding: int (zeros on both sides) or pair `(before, after)` of
            non-negative ints: zero channels added before and after.
        data_format: `"channels_last"` (default) or `"channels_first"`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (`channels_last`) or
        `(batch, channels, rows, cols)`.

    Output shape:
        The same with `channels + before + after` channels.

    Raises:
        ValueError: for negative or malformed `padding`, or a bad
            `data_format`.

    Example:

    >>> import numpy as np
    >>> y = ChannelPad((1, 2))(np.ones((1, 2, 2, 3), "float32"))
    >>> tuple(y.shape), np.asarray(y)[0, 0, 0].tolist()
    ((1, 2, 2, 6), [0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    """

    def __init__(self, padding, data_format=None, **kwargs):
        super().__init__(**kwargs)
        received = padding
        if is_int(padding):
            padding = (int(padding), int(padding))
        try:
            padding = tuple(int(p) for p in padding)
        except (TypeError, ValueError):
            padding = None
        if padding is None or len(padding) != 2 or min(padding) < 0:
            raise ValueError(
                "Invalid value for argument `padding`. Expected a non-negative "
                "int or a pair (before, after) of non-negative ints. Received "
                f"padding={received!r}."
            )
        if data_format is None:
            data_format = keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "Invalid value for argument `data_format`. Expected "
                "'channels_last' or 'channels_first'. Received "
                f"data_format={data_format!r}."
            )
        self.padding = padding
        self.data_format = data_format
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _axis(self):
        return 3 if self.data_format == "channels_last" else 1

    def call(self, inputs):
        pads = [[0, 0]] * 4
        pads[self._axis()] = list(self.padding)
        return ops.pad(inputs, pads)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        axis = self._axis()
        if shape[axis] is not None:
            shape[axis] += sum(self.padding)
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({"padding": self.padding, "data_format": self.data_format})
        return config
