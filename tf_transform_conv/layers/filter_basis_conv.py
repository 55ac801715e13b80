"""`FilterBasisConv2D`: a convolution whose filters are sparse combinations of a filter basis.

What `strip_model` makes of an `InterspacePruning` wrapper of a `Conv2D`.
"""

import keras
import numpy as np
from keras import ops

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.ops.basis import combine_basis


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class FilterBasisConv2D(keras.layers.Layer):
    """2D convolution whose filters are sparse combinations of a `kh x kw` filter basis.

    Computes what `keras.layers.Conv2D` computes with the kernel
    `W[:, :, c, o] = sum_j coefficients[j, c, o] * F_j`, where the basis
    `F` holds `kh * kw` filters (one basis per depth group of input
    channels), without ever forming `W`: every input channel is convolved
    with the basis filters (a depthwise convolution, strides, padding and
    dilation included), then the coefficients mix the `c_in * kh * kw`
    responses into the output filters: a 1x1 convolution, written as a
    `(1, kh * kw)` convolution with stride `(1, kh * kw)` over the responses
    laid side by side, so that its kernel rows are `c_in` wide. The
    coefficients are usually sparse (from `InterspacePruning`):
    `export_tflite` stores them in TFLite's sparse encoding (short `c_in`
    rows take 1-byte indices while `c_in < 256`), and the file never holds a
    dense kernel. The intermediate activation has `kh * kw` times the
    input's values.

    Args:
        filters: int, output channels.
        kernel_size: int or pair.
        strides: as `keras.layers.Conv2D`.
        padding: as `keras.layers.Conv2D`.
        data_format: as `keras.layers.Conv2D`.
        dilation_rate: as `keras.layers.Conv2D`.
        activation: as `keras.layers.Conv2D`.
        use_bias: as `keras.layers.Conv2D`.
        depth_groups: int >= 1 dividing the input channels: the number of
            bases, one per contiguous group of input channels.
        basis_initializer: initializer of the basis. Defaults to the
            standard basis.
        coefficient_initializer: initializer of the coefficients.
            Defaults to glorot uniform.
        bias_initializer: initializer of the bias. Defaults to zeros.

    Input shape:
        4D `(batch, rows, cols, c_in)` (`channels_first`: `(batch, c_in,
        rows, cols)`).

    Output shape:
        4D, as `Conv2D` with the same arguments.

    Example:

    >>> import keras, numpy as np
    >>> layer = FilterBasisConv2D(4, 3, padding="same")
    >>> y = layer(np.ones((2, 5, 5, 3), "float32"))
    >>> tuple(y.shape), tuple(layer.basis.shape), tuple(layer.coefficients.shape)
    ((2, 5, 5, 4), (3, 3, 1, 9), (9, 3, 4))
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        depth_groups=1,
        basis_initializer=None,
        coefficient_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Conv2D normalises and checks the convolution arguments.
        reference = keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding=padding,
            data_format=data_format, dilation_rate=dilation_rate,
        )
        self.filters = reference.filters
        self.kernel_size = reference.kernel_size
        self.strides = reference.strides
        self.padding = reference.padding
        self.data_format = reference.data_format
        self.dilation_rate = reference.dilation_rate
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.depth_groups = check_positive_int(depth_groups, "depth_groups")
        self.basis_initializer = (
            None if basis_initializer is None else keras.initializers.get(basis_initializer)
        )
        self.coefficient_initializer = keras.initializers.get(coefficient_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._reference = reference

    @staticmethod
    def basis_to_depthwise(basis, kernel_size):
        """`(g, kh * kw, kh * kw)` basis rows as a depthwise kernel `(kh, kw, g, kh * kw)`."""
        basis = np.asarray(basis)
        g, taps, _ = basis.shape
        return np.transpose(basis, (2, 0, 1)).reshape(*kernel_size, g, taps)

    def build(self, input_shape):
        axis = -1 if self.data_format == "channels_last" else 1
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"FilterBasisConv2D '{self.name}' needs a known number of input "
                f"channels. Received input_shape={input_shape}."
            )
        if channels % self.depth_groups:
            raise ValueError(
                f"The input channels ({channels}) of layer '{self.name}' must be "
                f"divisible by depth_groups={self.depth_groups}."
            )
        kh, kw = self.kernel_size
        taps = kh * kw
        initializer = self.basis_initializer or keras.initializers.Constant(
            self.basis_to_depthwise(
                np.broadcast_to(np.eye(taps, dtype="float32"),
                                (self.depth_groups, taps, taps)), (kh, kw))
        )
        self.basis = self.add_weight(
            name="basis", shape=(kh, kw, self.depth_groups, taps), initializer=initializer,
        )
        self.coefficients = self.add_weight(
            name="coefficients", shape=(taps, channels, self.filters),
            initializer=self.coefficient_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=self.bias_initializer
            )

    def materialized_kernel(self, dtype=None):
        """The equivalent `Conv2D` kernel `(kh, kw, c_in, filters)`."""
        dtype = dtype or self.basis.dtype
        taps, channels, filters = self.coefficients.shape
        # The depthwise kernel (kh, kw, g, j) holds basis filter j at its taps.
        rows = ops.transpose(ops.reshape(self.basis, (taps, self.depth_groups, taps)), (1, 2, 0))
        coefficients = ops.reshape(self.coefficients, (*self.kernel_size, channels, filters))
        return combine_basis(rows, coefficients, dtype)

    def call(self, inputs):
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        dtype = self.compute_dtype
        taps, channels, filters = self.coefficients.shape
        g = self.depth_groups
        shape = ops.shape(x)
        rows, cols = shape[1], shape[2]
        # Fold the channels of a group into the batch: one depthwise
        # convolution of g channels, each with its group's taps basis filters.
        x = ops.reshape(x, (-1, rows, cols, g, channels // g))
        x = ops.transpose(x, (0, 4, 1, 2, 3))
        x = ops.reshape(x, (-1, rows, cols, g))
        x = ops.depthwise_conv(
            x, ops.cast(self.basis, dtype), strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format="channels_last",
        )
        shape = ops.shape(x)
        out_rows, out_cols = shape[1], shape[2]
        # (batch * c / g, rows, cols, g * taps) -> (batch, rows, cols * taps, c):
        # each position's taps responses side by side, every channel in each.
        x = ops.reshape(x, (-1, channels // g, out_rows, out_cols, g, taps))
        x = ops.transpose(x, (0, 2, 3, 5, 4, 1))
        x = ops.reshape(x, (-1, out_rows, out_cols * taps, channels))
        kernel = ops.reshape(ops.cast(self.coefficients, dtype), (1, taps, channels, filters))
        y = ops.conv(x, kernel, strides=(1, taps), data_format="channels_last")
        if self.use_bias:
            y = y + ops.cast(self.bias, dtype)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return self._reference.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "depth_groups": self.depth_groups,
            "basis_initializer": None if self.basis_initializer is None
            else keras.initializers.serialize(self.basis_initializer),
            "coefficient_initializer": keras.initializers.serialize(
                self.coefficient_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config
