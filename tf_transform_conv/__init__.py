"""tf_transform_conv: compact CNNs whose filters are cheap spatial transforms of a few bases."""

from tf_transform_conv import cost
from tf_transform_conv import transforms
from tf_transform_conv.cost import model_cost
from tf_transform_conv.layers import TransformConv2D

__version__ = "0.1.0"

__all__ = ["TransformConv2D", "cost", "model_cost", "transforms", "__version__"]
