"""The package's Keras layers, one per module.

- `TransformConv2D` (`transform_conv`): filters built as transforms of a few
  learned bases; the product of this package.
- `FilterBasisConv2D` (`filter_basis_conv`) and `FilterBasisTransformConv2D`
  (`filter_basis_transform_conv`): convolutions whose filters (or bases) are
  sparse combinations of a small filter basis, what interspace pruning strips
  to.
- `ChannelPad` (`channel_pad`): zero channels around the input's, for
  "option A" residual shortcuts.
- `ChannelGather` (`channel_gather`): a channel reorder, inserted by the
  export pass that keeps grouped layers' channel order.

Every layer is registered for Keras serialisation (package
`"tf_transform_conv"`), so `.keras` files holding them load with
`keras.saving.load_model(path, safe_mode=True)`.
"""

from tf_transform_conv.layers.channel_gather import ChannelGather
from tf_transform_conv.layers.channel_pad import ChannelPad
from tf_transform_conv.layers.filter_basis_conv import FilterBasisConv2D
from tf_transform_conv.layers.filter_basis_transform_conv import FilterBasisTransformConv2D
from tf_transform_conv.layers.transform_conv import TransformConv2D

__all__ = [
    "ChannelGather",
    "ChannelPad",
    "FilterBasisConv2D",
    "FilterBasisTransformConv2D",
    "TransformConv2D",
]
