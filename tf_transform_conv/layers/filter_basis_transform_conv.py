"""`FilterBasisTransformConv2D`: a `TransformConv2D` whose bases live in a filter basis.

What `strip_model` makes of an `InterspacePruning` wrapper of a
`TransformConv2D`: both savings stack (fewer bases, sparse coefficients).
"""

import keras
import numpy as np

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops.basis import combine_basis


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class FilterBasisTransformConv2D(TransformConv2D):
    """A `TransformConv2D` whose bases are sparse combinations of a `kh x kw` filter basis.

    Computes what `TransformConv2D` computes with the bases
    `B[:, :, c, b] = sum_j C[j, c, b] * F_j`: `base_kernel` holds the
    coefficients, read as `C = reshape(base_kernel, (kh * kw, c_in,
    base_filters))`, and `basis_filters` the `kh * kw` basis filters `F`
    (one basis per contiguous group of input channels, `basis_groups` of
    them), both trainable. Every output filter is then its transform of a
    base, as in `TransformConv2D` (both execution paths, every family). It
    is what `strip_model` makes of an `InterspacePruning` wrapper of a
    `TransformConv2D`, whose coefficients are mostly zeros.

    `export_tflite` writes it in the grouped form with the coefficients as
    the product convolution (`C` instead of the bases, stored in TFLite's
    sparse encoding, never as a dense kernel), a grouped 1x1 convolution
    that turns each base's `kh * kw` coefficient products into its tap
    products with `F` (`kh * kw` multiply-adds per product), and the
    spread convolution as for `TransformConv2D`.

    Args:
        basis_groups: int >= 1 dividing `depth_groups`: the number of
            bases. Defaults to 1.
        basis_initializer: initializer of `basis_filters`
            `(basis_groups, kh * kw, kh * kw)`; defaults to the standard
            basis (`base_kernel` then holds the bases themselves).
        **kwargs: the other arguments, as `TransformConv2D`
            (`kernel_initializer` initialises the coefficients).

    Example:

    >>> import numpy as np
    >>> layer = FilterBasisTransformConv2D(8, 3, base_filters=2, basis_groups=1)
    >>> _ = layer(np.zeros((1, 5, 5, 4), "float32"))
    >>> tuple(layer.base_kernel.shape), tuple(layer.basis_filters.shape)
    ((3, 3, 4, 2), (1, 9, 9))
    """

    def __init__(self, filters, kernel_size, basis_groups=1, basis_initializer=None,
                 **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self.basis_groups = check_positive_int(basis_groups, "basis_groups")
        if self.depth_groups % self.basis_groups:
            raise ValueError(
                f"basis_groups={self.basis_groups} must divide depth_groups="
                f"{self.depth_groups} in layer '{self.name}': each channel group of "
                "the transforms lies in one basis group."
            )
        self.basis_initializer = (
            None if basis_initializer is None else keras.initializers.get(basis_initializer)
        )

    def build(self, input_shape):
        super().build(input_shape)
        kh, kw = self.kernel_size
        taps = kh * kw
        self.basis_filters = self.add_weight(
            name="basis", shape=(self.basis_groups, taps, taps),
            initializer=self.basis_initializer or keras.initializers.Constant(
                np.broadcast_to(np.eye(taps, dtype="float32"),
                                (self.basis_groups, taps, taps))),
            trainable=True, dtype=self.dtype,
        )

    def _bases(self, dtype):
        return combine_basis(self.basis_filters, self.base_kernel, dtype)

    def get_config(self):
        config = super().get_config()
        config.update({
            "basis_groups": self.basis_groups,
            "basis_initializer": None if self.basis_initializer is None
            else keras.initializers.serialize(self.basis_initializer),
        })
        return config
