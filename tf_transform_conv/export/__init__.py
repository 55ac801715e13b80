"""Deployment: TFLite and SavedModel files, their check against Keras, and their speed.

- `tflite`: `export_tflite`, the `.tflite` file that stores only the bases.
- `grouped`: the grouped TFLite form of a `TransformConv2D` (two
  convolutions), `GroupedTransformConv2D`.
- `lowering`: which form each layer takes (grouped, slices, dense).
- `file_bytes`: the bytes each form of a layer adds to a file, per
  quantization (what `lowering="auto"` weighs).
- `product_scales`: one scale per product kernel of the grouped form in
  int8 files.
- `sparse_scales`: drops the duplicate scales of sparse constants in int8
  files.
- `channel_order`: the graph pass that keeps grouped layers' channel order
  and folds batch norm into them.
- `deploy`: the model rewrites export converts (`deployment_model`,
  `factored_model`, `float32_model`).
- `interpreter`: running and checking files in LiteRT (`run_tflite`,
  `verify_tflite`, `tflite_op_counts`).
- `saved_model`: `export_saved_model`.
- `latency`: measured LiteRT latency of files and single layers
  (`tflite_latency`, `LatencyTable`).
- `checks`: what a model and a path must be for export.
"""

from tf_transform_conv.export.channel_order import propagate_channel_order
from tf_transform_conv.export.deploy import deployment_model
from tf_transform_conv.export.deploy import factored_model
from tf_transform_conv.export.deploy import float32_model
from tf_transform_conv.export.grouped import GroupedTransformConv2D
from tf_transform_conv.export.interpreter import TFLiteMismatchError
from tf_transform_conv.export.interpreter import VerifyResult
from tf_transform_conv.export.interpreter import run_tflite
from tf_transform_conv.export.interpreter import tflite_op_counts
from tf_transform_conv.export.interpreter import verify_tflite
from tf_transform_conv.export.latency import LatencyTable
from tf_transform_conv.export.latency import tflite_latency
from tf_transform_conv.export.lowering import LOWERINGS
from tf_transform_conv.export.lowering import lowering_choice
from tf_transform_conv.export.saved_model import export_saved_model
from tf_transform_conv.export.tflite import QUANTIZATIONS
from tf_transform_conv.export.tflite import ExportResult
from tf_transform_conv.export.tflite import export_tflite
from tf_transform_conv.export.tflite import sparse_layers

__all__ = [
    "LOWERINGS",
    "QUANTIZATIONS",
    "ExportResult",
    "GroupedTransformConv2D",
    "LatencyTable",
    "TFLiteMismatchError",
    "VerifyResult",
    "deployment_model",
    "export_saved_model",
    "export_tflite",
    "factored_model",
    "float32_model",
    "lowering_choice",
    "propagate_channel_order",
    "run_tflite",
    "sparse_layers",
    "tflite_latency",
    "tflite_op_counts",
    "verify_tflite",
]
