"""Parameters and multiply-adds, per layer and per model.

Counts are for one sample (no batch dimension). A multiply-add (MAC) is one
multiplication accumulated into a sum; bias additions, activations and
normalisation are not counted, as is usual for MAC counts. Layers whose
multiply-adds are counted:

- `keras.layers.Conv2D` (strides, dilation, padding, `groups`):
  `H' * W' * kh * kw * (c_in / groups) * filters`.
- `keras.layers.DepthwiseConv2D`:
  `H' * W' * kh * kw * c_in * depth_multiplier`.
- `keras.layers.SeparableConv2D`, its depthwise then its pointwise stage:
  `H' * W' * c_in * depth_multiplier * (kh * kw + filters)`.
- `keras.layers.Conv2DTranspose`: every input value times every kernel tap,
  `H * W * kh * kw * c_in * filters` over the input `H * W` (the products a
  transposed convolution scatters; with `padding="same"` those landing in
  the cropped border included).
- `keras.layers.Dense`, on inputs of any rank `(..., c_in)`:
  `prod(...) * c_in * units`.
- `TransformConv2D`, both execution paths: the materialised path costs
  what the equivalent `Conv2D` costs (`dense_macs`); the factored path costs
  the base convolution's products, `H * W * c_in * kh * kw * base_filters`
  multiply-adds over the input (padded, where the factored path pads the
  input rather than the products), plus its second stage: for the discrete
  family `H' * W' * depth_groups * filters * kh * kw` additions (less the
  taps a shift zeroes), counted separately as `adds`; for a learned family
  as many multiply-adds (scalar) or `kh * kw` times as many (rotation,
  affine, general), counted in `macs` and reported as `transform_macs`.
  Learned transform parameters are counted in `params` and reported as
  `transform_params`.
- `TransformPruning` (a convolution being pruned, `tf_transform_conv.pruning`)
  as what it computes: the wrapped `Conv2D` with its current effective
  kernel, so the dense convolution's multiply-adds. Its parameters are the
  trainable ones: the wrapped layer's kernel (every filter, replaced ones
  included: they are still variables until `strip_model` drops them) and
  bias, the filter scales when `scale=True`, and a learned family's
  transform parameters (`transform_params`); the pruning state (step,
  mask, assignment table) is not counted.

- The unstructured wrappers and their stripped layer
  (`tf_transform_conv.pruning`, `tf_transform_conv.layers`): a `MagnitudePruning` as its wrapped
  layer; an `InterspacePruning` as its wrapped `Conv2D` (the dense kernel it
  convolves with) plus the basis, `groups * (kh * kw)^2` parameters; a
  `FilterBasisConv2D` as its two stages, `H' * W' * c_in * kh * kw * (kh * kw
  + filters)` multiply-adds (its 1x1 stage runs densified), with `dense_macs`
  the equivalent `Conv2D`'s. A `TransformConv2D` in a filter basis (an
  `InterspacePruning` of one, or the `FilterBasisTransformConv2D` it strips
  to) costs what the `TransformConv2D` does, plus the basis's parameters.

Every layer also reports its `nonzeros` (parameters less the zeros of its
kernel, or of a filter-basis layer's coefficients) and `nonzero_macs`, the
multiply-adds with only the nonzero kernel entries (what sparse execution
would cost: `macs * nnz / size` for a convolution or `Dense`; for an
interspace layer, both stages with only the nonzero basis taps and
coefficients; for a `TransformConv2D` in a filter basis on its factored
path, the products with only the nonzero coefficients, the basis's nonzero
taps turning them into tap products (as its TFLite form computes), and the
rest of the factored path). Layers without a kernel report their `params`
and `macs`.

Every other layer counts `layer.count_params()` parameters. Its multiply-adds
are 0 when its work is not multiply-adds by the convention above:
activations, dropout and noise, normalisation, pooling, reshaping, merging
(except `Dot`), preprocessing, input and masking layers, and embedding
lookups. Any other layer (`Conv1D`, `Conv3D`, recurrent, attention, `Dot`,
`EinsumDense`, wrappers, `Lambda` and custom layers) has multiply-adds this
module does not count: it reports `macs_counted=False` (its `macs` of 0 is
not a count and is left out of every total), `ModelCost.uncounted` lists
it, and `summary()` marks it.

How a layer is costed is a *rule* in a registry, looked up along the
layer's class hierarchy (`register_layer_cost`): Keras's layers
(`cost.keras_layers`) and the package's layers (`cost.transform_layers`)
register theirs here, each pruning wrapper registers its own where it is
defined, and a user registers a rule for a custom layer the same way.
"""

import dataclasses

import keras

from tf_transform_conv import _compat
from tf_transform_conv.graph.nodes import graph_nodes

__all__ = [
    "CostTerms",
    "LayerCost",
    "ModelCost",
    "cost_terms",
    "layer_cost",
    "model_cost",
    "register_layer_cost",
]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """The cost of one call of one layer, for one sample.

    Attributes:
        name: str, the layer's name; inside a nested model, prefixed with
            the nested model's name (`"block/conv"`).
        class_name: str, the layer's class name (`"Conv2D"`).
        output_shape: tuple, the output shape without the batch dimension;
            for a layer with several outputs, a tuple of such shapes.
        params: int, the layer's parameters (0 for the second and later
            calls of a shared layer in `model_cost`).
        macs: int, the multiply-adds of the path the layer actually runs:
            for a `TransformConv2D`, the factored path's when
            `implementation == "factored"`, else the materialised path's.
        adds: int, the factored path's additions when the layer runs
            factored, else 0.
        dense_macs: int, what an ordinary `Conv2D` with the same filters
            would cost; equal to `macs` for every other layer.
        implementation: `"factored"` or `"materialized"` for a
            `TransformConv2D`, else `None`.
        transform_params: int, the learned transform family's parameters
            (included in `params`; 0 for the discrete family and other
            layers).
        transform_macs: int, the learned family's second-stage
            multiply-adds when the layer runs factored (included in `macs`).
        macs_counted: bool, False for a layer whose multiply-adds this
            module has no formula for (see the module docstring): its
            `macs` and `dense_macs` are then 0 and not a count.
        nonzeros: int, the parameters less the zeros of the kernel (of
            the coefficients for interspace layers); `params` for a layer
            without a kernel (None when built from an old dict).
        nonzero_macs: int, the multiply-adds with only the nonzero kernel
            entries (sparse execution); `macs` for a layer without a kernel.
    """

    name: str
    class_name: str
    output_shape: tuple
    params: int
    macs: int
    adds: int
    dense_macs: int
    implementation: str = None
    transform_params: int = 0
    transform_macs: int = 0
    macs_counted: bool = True
    nonzeros: int = None
    nonzero_macs: int = None

    def to_dict(self):
        """A JSON-serialisable dict of the fields (shapes as lists)."""
        out = dataclasses.asdict(self)
        out["output_shape"] = _shape_to_list(self.output_shape)
        return out


@dataclasses.dataclass
class ModelCost:
    """The cost of a model: one `LayerCost` per layer call, and totals.

    Attributes:
        layers: list of `LayerCost`, in the order the model runs them.
        name: optional str, the model's name.
    """

    layers: list = dataclasses.field(default_factory=list)
    name: str = None

    @property
    def params(self):
        """Total parameters (a shared layer counted once)."""
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self):
        """Total multiply-adds of the paths the layers actually run (counted layers only)."""
        return sum(layer.macs for layer in self.layers)

    @property
    def uncounted(self):
        """The names of the layer calls whose multiply-adds are not counted."""
        return [layer.name for layer in self.layers if not layer.macs_counted]

    @property
    def adds(self):
        """Total additions of the factored `TransformConv2D` layers."""
        return sum(layer.adds for layer in self.layers)

    @property
    def dense_macs(self):
        """Total multiply-adds with every `TransformConv2D` as a `Conv2D`."""
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def nonzeros(self):
        """Total nonzero parameters (kernel zeros left out)."""
        return sum(layer.params if layer.nonzeros is None else layer.nonzeros
                   for layer in self.layers)

    @property
    def nonzero_macs(self):
        """Total multiply-adds with only the nonzero kernel entries (sparse execution)."""
        return sum(layer.macs if layer.nonzero_macs is None else layer.nonzero_macs
                   for layer in self.layers)

    @property
    def transform_params(self):
        """Total parameters of learned transform families (included in `params`)."""
        return sum(layer.transform_params for layer in self.layers)

    @property
    def transform_macs(self):
        """Total second-stage multiply-adds of learned families (included in `macs`)."""
        return sum(layer.transform_macs for layer in self.layers)

    def to_dict(self):
        """A JSON-serialisable dict: the totals and the per-layer list."""
        return {
            "name": self.name,
            "params": self.params,
            "macs": self.macs,
            "adds": self.adds,
            "dense_macs": self.dense_macs,
            "transform_params": self.transform_params,
            "transform_macs": self.transform_macs,
            "nonzeros": self.nonzeros,
            "nonzero_macs": self.nonzero_macs,
            "uncounted": self.uncounted,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def summary(self, print_fn=print):
        """Prints a table of the per-layer costs and the totals.

        Args:
            print_fn: callable taking one line (a str) at a time. Defaults
                to `print`.
        """
        header = ("Layer (type)", "Output shape", "Params", "MACs", "Adds", "Path")
        rows = [
            (
                f"{layer.name} ({layer.class_name})",
                str(_shape_to_tuple_str(layer.output_shape)),
                f"{layer.params:,}",
                f"{layer.macs:,}" if layer.macs_counted else "not counted",
                f"{layer.adds:,}",
                layer.implementation or "",
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(6)]
        right = (False, False, True, True, True, False)

        def line(row):
            cells = [
                cell.rjust(width) if r else cell.ljust(width)
                for cell, width, r in zip(row, widths, right)
            ]
            return "  ".join(cells).rstrip()

        rule = sum(widths) + 2 * (len(widths) - 1)
        if self.name:
            print_fn(f'Cost of model "{self.name}" (one sample)')
        print_fn("=" * rule)
        print_fn(line(header))
        print_fn("=" * rule)
        for row in rows:
            print_fn(line(row))
        print_fn("=" * rule)
        print_fn(f"Total params: {self.params:,}")
        if self.nonzeros != self.params:
            print_fn(f"  nonzero: {self.nonzeros:,} ({self.nonzeros / self.params:.1%})")
        if self.transform_params:
            print_fn(f"  of which learned transforms: {self.transform_params:,}")
        print_fn(f"Total MACs: {self.macs:,}")
        if self.transform_macs:
            print_fn(f"  of which learned transforms (second stage): {self.transform_macs:,}")
        print_fn(f"Total adds: {self.adds:,}")
        print_fn(f"Total MACs as dense Conv2D: {self.dense_macs:,}")
        if self.nonzero_macs != self.macs:
            print_fn(f"Total MACs with nonzero weights only (sparse execution): "
                     f"{self.nonzero_macs:,}")
        if self.dense_macs:
            print_fn(f"MACs / dense MACs: {self.macs / self.dense_macs:.1%}")
        uncounted = [f"{layer.name} ({layer.class_name})"
                     for layer in self.layers if not layer.macs_counted]
        if uncounted:
            print_fn(f"MACs not counted (no formula; left out of the totals): "
                     f"{', '.join(uncounted)}")
        print_fn("=" * rule)


@dataclasses.dataclass(frozen=True)
class CostTerms:
    """What a cost rule returns for one call of one layer, for one sample.

    Attributes:
        params: int, the layer's parameters.
        macs: int, the multiply-adds of the path it runs.
        dense_macs: int, what an ordinary convolution with the same filters
            would cost (None: `macs`).
        adds: int, additions counted apart (a factored `TransformConv2D`).
        implementation: the path a `TransformConv2D` runs, else None.
        transform_params: int, learned transform parameters (in `params`).
        transform_macs: int, learned second-stage multiply-adds (in `macs`).
        nonzeros: int, `params` less the zeros of the kernel (None: `params`).
        nonzero_macs: int, the multiply-adds with only the nonzero weights
            (None: `macs`).
    """

    params: int
    macs: int
    dense_macs: int = None
    adds: int = 0
    implementation: str = None
    transform_params: int = 0
    transform_macs: int = 0
    nonzeros: int = None
    nonzero_macs: int = None

    def replace(self, **changes):
        """A copy with `changes`."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class _Rule:
    cost: object
    check_input: object


_RULES = {}


def register_layer_cost(layer_class, check_input=None):
    """Registers how calls of `layer_class` (and its subclasses) are costed.

    Use as a decorator on `rule(layer, input_shape, output_shape) ->
    CostTerms`, with shapes without the batch dimension (a list of shapes
    for a layer with several inputs). The rule of the nearest class in the
    layer's method resolution order is used; a layer with none counts
    `layer.count_params()` parameters and the multiply-adds the module
    docstring's convention gives (0, or not counted).

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        check_input: optional `(layer, input_shape) -> None` that raises a
            clear `ValueError` for an input shape the rule cannot take,
            before the output shape is inferred.

    Returns:
        The decorator (it returns the rule unchanged).

    Example:

    >>> import keras
    >>> class Scale(keras.layers.Layer):
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> @register_layer_cost(Scale)
    ... def _scale_cost(layer, input_shape, output_shape):
    ...     return CostTerms(params=0, macs=0)
    >>> layer_cost(Scale(), (4, 4, 3)).macs_counted
    True
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise ValueError(
            "Invalid value for argument `layer_class`. Expected a keras.layers.Layer "
            f"subclass. Received layer_class={layer_class!r}."
        )

    def register(rule):
        _RULES[layer_class] = _Rule(rule, check_input)
        return rule

    return register


def _rule_for(layer):
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def cost_terms(layer, input_shape, output_shape):
    """The `CostTerms` of one call of `layer` by its registered rule (a wrapper costs its
    wrapped layer this way).

    Raises:
        ValueError: for a layer whose class has no rule.
    """
    rule = _rule_for(layer)
    if rule is None:
        raise ValueError(
            f"No cost rule is registered for {type(layer).__name__} '{layer.name}': "
            "register one with tf_transform_conv.cost.register_layer_cost.")
    return rule.cost(layer, input_shape, output_shape)


def layer_cost(layer, input_shape):
    """The parameters and multiply-adds of one call of `layer`, for one sample.

    See the module docstring for the layers whose multiply-adds are counted
    and the formulas; every other layer counts `layer.count_params()`
    parameters and no multiply-adds. A built layer reports its actual
    parameter count; an unbuilt layer with a registered rule (`Conv2D`,
    `DepthwiseConv2D`, `SeparableConv2D`, `Conv2DTranspose`, `Dense`,
    `TransformConv2D`, `TransformPruning`, ...) gets it from its
    configuration and `input_shape`.

    Args:
        layer: a Keras layer.
        input_shape: tuple, the input shape without the batch dimension
            (`(rows, cols, channels)` for a `channels_last` convolution),
            or a list of such tuples for a layer with several inputs.

    Returns:
        A `LayerCost`.

    Raises:
        ValueError: if `layer` is a model (use `model_cost`), if
            `input_shape` has the wrong rank for the layer or unknown
            dimensions the count needs, if its channels do not match the
            built layer's or do not divide into its groups, or if `layer`
            is an unbuilt layer of another type.

    Example:

    >>> import keras
    >>> conv = keras.layers.Conv2D(16, 3, padding="same")
    >>> cost = layer_cost(conv, (10, 10, 8))
    >>> cost.params, cost.macs  # 3*3*8*16 + 16, 10*10 * 3*3*8*16
    (1168, 115200)
    """
    if isinstance(layer, keras.Model):
        raise ValueError(
            f"layer_cost() takes a single layer; received the model "
            f"'{layer.name}'. Use model_cost() for models."
        )
    input_shape = _standardize_input_shape(input_shape, layer)
    rule = _rule_for(layer)
    if rule is not None and rule.check_input is not None:
        rule.check_input(layer, input_shape)
    output_shape = _infer_output_shape(layer, input_shape)
    return _layer_cost(layer, input_shape, output_shape, count_params=True)


def model_cost(model):
    """The parameters and multiply-adds of a built Keras model, for one sample.

    Walks the model's graph from its outputs back to its inputs, one entry
    per layer call, in an order the model could run them. Nested
    (Functional or Sequential) models are descended into; their layers are
    named `"nested_model/layer"`. A layer called several times (a shared
    layer, or a nested model called twice) has one entry per call: its
    multiply-adds count at every call, its parameters only at the first.
    Input layers, and operations that are not layers, are left out.

    Args:
        model: a built Functional or `Sequential` Keras model whose layers'
            input shapes are known (apart from the batch dimension).

    Returns:
        A `ModelCost`.

    Raises:
        ValueError: if `model` is not a model, is not built, is a subclassed
            model (no graph to walk: call `layer_cost` on its layers
            instead), or contains a subclassed model; and as `layer_cost`
            for a layer whose input shape lacks a dimension its count needs.

    Example:

    >>> import keras
    >>> from tf_transform_conv import TransformConv2D
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    >>> x = TransformConv2D(16, 3, base_filters=4, padding="same",
    ...                     implementation="factored")(x)
    >>> cost = model_cost(keras.Model(inputs, x))
    >>> cost.params  # (3*3*3*8 + 8) + (3*3*8*4 + 16)
    528
    >>> cost.macs  # 8*8*3*3*3*8 + 8*8*8*3*3*4
    32256
    >>> cost.adds  # 8*8*16*3*3
    9216
    >>> cost.dense_macs  # 8*8*3*3*3*8 + 8*8*3*3*8*16
    87552
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "model_cost() expects a Keras model. Received "
            f"{type(model).__name__}; use layer_cost() for a single layer."
        )
    result = ModelCost(layers=[], name=model.name)
    _walk_model(model, prefix="", seen=set(), out=result.layers)
    return result


# ----------------------------------------------------------------------
# Per-call arithmetic


def _layer_cost(layer, input_shape, output_shape, count_params):
    """The `LayerCost` of `layer` on `input_shape` giving `output_shape`."""
    rule = _rule_for(layer)
    counted = True
    if rule is not None:
        terms = rule.cost(layer, input_shape, output_shape)
    else:
        if not layer.built:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) is not built, so its "
                "parameters are unknown. Build it (call it on an input, or "
                "call build(input_shape)) first."
            )
        terms = CostTerms(params=layer.count_params(), macs=0, dense_macs=0)
        counted = _no_macs_by_convention(layer)
    params = terms.params if count_params else 0
    return LayerCost(
        name=layer.name,
        class_name=type(layer).__name__,
        output_shape=output_shape,
        params=int(params),
        macs=int(terms.macs),
        adds=int(terms.adds),
        dense_macs=int(terms.macs if terms.dense_macs is None else terms.dense_macs),
        implementation=terms.implementation,
        transform_params=int(terms.transform_params) if count_params else 0,
        transform_macs=int(terms.transform_macs),
        macs_counted=counted,
        nonzeros=int(terms.params if terms.nonzeros is None else terms.nonzeros)
        if count_params else 0,
        nonzero_macs=int(terms.macs if terms.nonzero_macs is None else terms.nonzero_macs),
    )


# Keras's own layer packages whose work is not multiply-adds by this module's
# convention (the module docstring), with the core layers of the same kind
# and the exceptions inside those packages.
_NO_MACS_PACKAGES = (
    "activations", "regularization", "normalization", "pooling", "reshaping",
    "merging", "preprocessing",
)
_NO_MACS_CORE = (
    keras.layers.InputLayer, keras.layers.Identity, keras.layers.Masking,
    keras.layers.Embedding,
)
_MACS_ANYWAY = tuple(
    cls for cls in (
        getattr(keras.layers, name, None)
        for name in ("Dot", "ReversibleEmbedding", "STFTSpectrogram", "MelSpectrogram")
    )
    if cls is not None
)


def _no_macs_by_convention(layer):
    """Whether `layer` (one without a formula) does no multiply-adds by convention."""
    if isinstance(layer, _MACS_ANYWAY + (keras.layers.Wrapper,)):
        return False
    if isinstance(layer, _NO_MACS_CORE):
        return True
    for cls in type(layer).__mro__:  # the first Keras class it derives from
        package = _compat.keras_layer_package(cls)
        if package is not None:
            return package in _NO_MACS_PACKAGES
    return False


# ----------------------------------------------------------------------
# Shapes and checks, shared by the rules


def image_dims(layer, shape, what="input"):
    """`(rows, cols, channels)` of a 3D shape without batch, all known, in `layer.data_format`."""
    if shape is None or len(shape) != 3 or not all(
        d is None or isinstance(d, int) for d in shape
    ):
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) expects a 3D "
            f"{what}_shape (rows, cols, channels) or (channels, rows, cols), "
            f"without the batch dimension. Received {what}_shape={shape}."
        )
    require_known(layer, shape, shape, what)
    if layer.data_format == "channels_first":
        c, h, w = shape
    else:
        h, w, c = shape
    return h, w, c


def require_known(layer, dims, shape, what="input"):
    if any(d is None for d in dims):
        raise ValueError(
            f"The cost of layer '{layer.name}' ({type(layer).__name__}) needs "
            f"every dimension of its {what} apart from the batch. Received "
            f"{what}_shape={shape}. Build the model with a fixed input size."
        )


def check_built_channels(layer, channels, axis, input_shape, kernel="kernel"):
    """A built layer's weight `kernel` (an attribute name) must match the input channels it is costed on."""
    if not layer.built:
        return
    built = tuple(getattr(layer, kernel).shape)[axis]
    if built != channels:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) was built for "
            f"{built} input channels (per group), but input_shape={input_shape} "
            f"gives {channels}."
        )


def built_params(layer, formula):
    """The actual parameter count of a built layer, else the formula."""
    return layer.count_params() if layer.built else formula


def is_shape(value):
    return isinstance(value, (tuple, list)) and all(
        d is None or isinstance(d, int) for d in value
    )


def _standardize_input_shape(input_shape, layer):
    """A tuple (or a list of tuples) of ints or None, without batch."""

    def one(shape):
        try:
            return tuple(None if d is None else int(d) for d in shape)
        except (TypeError, ValueError):
            raise ValueError(
                f"Expected `input_shape` for layer '{layer.name}' to be a tuple "
                "of ints (or None) without the batch dimension, or a list of "
                f"such tuples. Received input_shape={input_shape!r}."
            ) from None

    if isinstance(input_shape, (tuple, list)) and input_shape and all(
        isinstance(s, (tuple, list)) for s in input_shape
    ):
        shapes = [one(s) for s in input_shape]
        return shapes[0] if len(shapes) == 1 else shapes
    return one(input_shape)


def _infer_output_shape(layer, input_shape):
    """The layer's output shape without batch, from `compute_output_spec`."""
    if isinstance(input_shape, list):
        args = [keras.KerasTensor((None,) + s) for s in input_shape]
    else:
        args = keras.KerasTensor((None,) + input_shape)
    try:
        spec = layer.compute_output_spec(args)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"Could not infer the output shape of layer '{layer.name}' "
            f"({type(layer).__name__}) for input_shape={input_shape}: {error}"
        ) from error
    return _output_shape(keras.tree.flatten(spec))


def _output_shape(tensors):
    shapes = tuple(tuple(t.shape)[1:] for t in tensors)
    return shapes[0] if len(shapes) == 1 else shapes


def _shape_to_list(shape):
    if isinstance(shape, (tuple, list)):
        return [_shape_to_list(d) for d in shape]
    return shape


def _shape_to_tuple_str(shape):
    if isinstance(shape, (tuple, list)) and shape and not is_shape(shape):
        return ", ".join(str(tuple(s)) for s in shape)
    return str(tuple(shape))


def pair(value, name):
    if isinstance(value, int):
        return value, value
    try:
        kh, kw = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected `{name}` to be an int or a pair of ints. Received "
            f"{name}={value!r}."
        ) from None
    return kh, kw


# ----------------------------------------------------------------------
# Walking a model's graph


def _walk_model(model, prefix, seen, out):
    for node in graph_nodes(model):
        layer = node.operation
        if not isinstance(layer, keras.layers.Layer) or isinstance(
            layer, keras.layers.InputLayer
        ):
            continue
        if isinstance(layer, keras.Model):
            _walk_model(layer, prefix + layer.name + "/", seen, out)
            continue
        shapes = [tuple(t.shape)[1:] for t in node.input_tensors]
        input_shape = shapes[0] if len(shapes) == 1 else shapes
        cost = _layer_cost(
            layer,
            input_shape,
            _output_shape(node.output_tensors),
            count_params=id(layer) not in seen,
        )
        seen.add(id(layer))
        out.append(dataclasses.replace(cost, name=prefix + cost.name))
