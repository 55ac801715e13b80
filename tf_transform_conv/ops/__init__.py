"""The math of transformed filters, without layers: numpy and `keras.ops` functions.

- `transforms`: the discrete transforms (rotations, mirrors, one-tap shifts)
  as tables of the taps they move.
- `families`: the learned tap operators (scalar, rotation, affine, general)
  and their least-squares fits.
- `layout`: assignments of outputs to bases and transforms, templates, and
  the index tables both execution paths read.
- `factored`: the factored execution (products, then shifted sums) and its
  dense gradient.
- `assignment`: fitting bases and `(base, transform, scale)` to a dense
  kernel; global allocation of bases between layers.
- `basis`: filter bases (standard, DCT) for interspace pruning.
- `masks`: magnitude pruning masks.
"""

from tf_transform_conv.ops import assignment
from tf_transform_conv.ops import basis
from tf_transform_conv.ops import factored
from tf_transform_conv.ops import families
from tf_transform_conv.ops import layout
from tf_transform_conv.ops import masks
from tf_transform_conv.ops import transforms

__all__ = ["assignment", "basis", "factored", "families", "layout", "masks", "transforms"]
