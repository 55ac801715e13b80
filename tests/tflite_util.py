"""What a `.tflite` file holds, for the export tests: its tensors (read with the
LiteRT interpreter) and the bytes it may spend besides its weights."""

from tf_transform_conv.export.lowering import LOWERING_VALUE_BYTES

# What a `.tflite` file holds besides the weights: the flatbuffer's tables,
# the operators, every tensor's shape, type and name, the small constant
# index tensors of slices, pads and reshapes, and the constants a lowering
# adds (the grouped form's spread values with their sparse indices, and the
# zero biases the converter gives its convolutions). Measured with TF 2.21 by
# exporting the models named here as float32 (overhead = file bytes minus
# 4 bytes per parameter; operators counted with `export.tflite_op_counts`).
# The per-value cost of the lowering's constants, `LOWERING_VALUE_BYTES`, is
# the library's (`tf_transform_conv.export.lowering`, which prices the grouped form
# with it); the rest is the tests' budget:
#
# - FILE_OVERHEAD_BYTES: a model with one operator and 2-5 parameters
#   (`Input((4,)) -> Dense(1)`, `Input((1, 1, 1)) -> Dense(1)`) exports to
#   952-988 bytes; rounded up to 1 KiB.
# - OP_OVERHEAD_BYTES: chains of 1, 2 and 4 factored 3x3 `TransformConv2D`s
#   written as slices on a 16x16x1 input with one base each (13-257
#   parameters) have an overhead of 17,836 / 30,968 / 58,128 bytes for
#   77 / 154 / 308 operators under "rotations", and 23,168 / 41,208 /
#   78,792 bytes for 109 / 218 / 436 operators under "d4": 170-175 bytes
#   per operator, rounded up to 192.
# - FIXED_OVERHEAD: the graph of the size test (`test_export.py`: a
#   16x16 input, then two factored 3x3
#   `TransformConv2D(256, base_filters=32, transforms="d4")`) written as
#   slices (218 operators) on one input channel with one base per layer
#   (97 parameters) exports to 41,596 bytes, 41,208 of them overhead;
#   rounded up to 48 KiB. It covers graphs up to about 250 slice operators
#   or a few thousand grouped-form values; for larger ones use
#   `overhead_allowance(num_ops, lowering_values)`. Against the 2.95 MB of
#   that model's dense kernel it is 1.7%, so a file holding the materialised
#   kernel cannot pass `bytes <= 1.10 * param_bytes + FIXED_OVERHEAD`. (The
#   real size-test export: 390,488 bytes for 370,688 parameter bytes in the
#   grouped form, 409,224 as slices, TF 2.21.) Quantized files spend more per tensor
#   (scales and zero points): about 40 KB (float16), 47 KB (dynamic) and
#   55 KB (int8) for the same graph as slices.
FILE_OVERHEAD_BYTES = 1024
OP_OVERHEAD_BYTES = 192
FIXED_OVERHEAD = 48 * 1024


def overhead_allowance(num_ops, lowering_values=0):
    """Bytes a `.tflite` file may spend besides its weights.

    `FILE_OVERHEAD_BYTES + OP_OVERHEAD_BYTES * num_ops +
    LOWERING_VALUE_BYTES * lowering_values`, for a file of `num_ops`
    operators whose lowering adds `lowering_values` constants
    (`ExportResult.lowering_values`); see the comment on these constants
    above (and on `export.lowering.LOWERING_VALUE_BYTES`) for how they were measured.

    Example:

    >>> overhead_allowance(218)
    42880
    >>> overhead_allowance(11, lowering_values=5184)
    44608
    """
    return (
        FILE_OVERHEAD_BYTES
        + OP_OVERHEAD_BYTES * int(num_ops)
        + LOWERING_VALUE_BYTES * int(lowering_values)
    )



def tensor_shapes(path):
    """Shapes of every tensor in a `.tflite` file (constants included)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return {tuple(int(d) for d in t["shape"]) for t in interpreter.get_tensor_details()}
