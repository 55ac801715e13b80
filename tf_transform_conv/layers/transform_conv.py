"""`TransformConv2D`: a convolution whose filters are spatial transforms of a few bases."""


import warnings

import keras
import numpy as np
from keras import ops

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_bool
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import is_int
from tf_transform_conv.ops import factored as factored_lib
from tf_transform_conv.ops import families as families_lib
from tf_transform_conv.ops import layout as layout_lib
from tf_transform_conv.ops import transforms as transforms_lib

IMPLEMENTATIONS = ("auto", "materialized", "factored")

# `implementation="auto"` runs the factored path for inference under XLA when
# measured conditions hold (`benchmarks/layer_speed.py`, XLA on a 2-core CPU;
# see docs/benchmarks/layer_speed.md): the base products are at most a quarter of the dense
# multiply-adds (`strides**2 * base_filters / filters <= 1/4`: at 1/2 the
# additions eat the saving), each depth group sees at least 16 input channels
# (the second stage's work per output pixel, `kh*kw*filters*depth_groups`
# terms, stays small against the products), and the per-image product tensor
# `P` fits in `AUTO_MAX_PRODUCT_BYTES` (beyond it the additions stream `P` from
# main memory and lose). The rotation, affine and general families, whose
# second stage does `kh*kw` times the terms, also need at least
# `AUTO_MIN_DENSE_OPERATOR_CHANNELS` channels per group. Without XLA (Keras's
# default on CPU) the factored path's slices and additions run as separate
# operations and measured 1.1-7x slower than the materialised convolution, so
# `auto` runs materialised there. Training steps (whose factored backward pass
# is the dense convolution's, `ops.factored.dense_gradient`) run factored under
# XLA from `AUTO_MIN_TRAINING_GROUP_CHANNELS` channels per group when the
# outputs need no reordering (0.77-0.97x the materialised step measured;
# below 64 channels, and for the scattered assignments of converted models,
# slower).
AUTO_MAX_PRODUCT_FRACTION = 0.25
AUTO_MIN_GROUP_CHANNELS = 16
AUTO_MIN_DENSE_OPERATOR_CHANNELS = 128
AUTO_MIN_TRAINING_GROUP_CHANNELS = 64
AUTO_MAX_PRODUCT_BYTES = 1 << 20


def _standardize_pair(value, name):
    """`(a, b)` from an int or a tuple/list of two ints, all strictly positive."""
    pair = (value, value) if is_int(value) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(is_int(v) and v >= 1 for v in pair)
    ):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a strictly positive "
            f"int or a tuple of 2 strictly positive ints"
            f"{' (not a string)' if isinstance(value, str) else ''}. Received "
            f"{name}={value!r}."
        )
    return tuple(int(v) for v in pair)


def _standardize_data_format(data_format):
    if data_format is None:
        return keras.config.image_data_format()
    if not isinstance(data_format, str) or data_format.lower() not in (
        "channels_last",
        "channels_first",
    ):
        raise ValueError(
            "Invalid value for argument `data_format`. Expected "
            "'channels_last' or 'channels_first'. Received "
            f"data_format={data_format!r}."
        )
    return data_format.lower()


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class TransformConv2D(keras.layers.Layer):
    """2D convolution whose filters are cheap spatial transforms of a few bases.

    The layer learns only `base_filters` kernels `B` of shape
    `(kh, kw, c_in, base_filters)` and computes exactly what
    `keras.layers.Conv2D` computes with the *materialised* kernel

        W[..., o] = scale[o] * S_o(B[..., b(o)])

    where the *assignment* gives each output filter `o` a base `b(o)` and a
    discrete transform `t(o)` (rotation, mirror or one-tap shift; see
    `tf_transform_conv.ops.transforms`), and `S_o` is a linear operator on the
    `kh * kw` taps, the same for every input channel. The
    `transform_family` says how `S_o` is built
    (`tf_transform_conv.ops.families`): `"discrete"` is the transform `t(o)`
    itself; the learned families refine it with a per-filter operator,
    `S_o = L(phi_o) @ T_{t(o)}`: `"scalar"` a learned multiplier per tap (the
    paper's default), `"rotation"` a learned angle and amplitude,
    `"affine"` a learned 2x3 matrix (both by bilinear sampling of the taps),
    `"general"` any `taps x taps` matrix. `L` starts at the identity, so a
    learned layer starts as its discrete one. The first output of each base
    under the `identity` transform is its *template* and learns nothing.
    With `depth_groups=g` the input channels are split into `g` contiguous
    groups, each with its own assignment and transforms. Parameters fall by
    about `base_filters / filters` against `Conv2D`; with the factored
    execution the multiply-adds fall by about the same factor.

    Reference: R. Miles, K. Mikolajczyk, "Reconstructing Pruned Filters using
    Cheap Spatial Transformations", ICCV Workshops 2023 (arXiv 2110.12844).

    Two execution paths give the same result:

    - `"materialized"`: build `W` from `B`, then one ordinary convolution.
      Multiply-adds equal the dense layer's.
    - `"factored"`: `P = x @ B` per tap (the base convolution's products,
      computed once), then each output sums shifted channels of `P`:
      `kh * kw` additions (discrete), multiply-adds (scalar) or
      `(kh * kw)**2` multiply-adds (rotation, affine, general) per output
      value and depth group (`tf_transform_conv.ops.factored`). Training steps
      differentiate it as the dense convolution, so memory stays bounded.
    - `"auto"` picks from the shapes when the layer is built;
      `implementation_used` and `implementation_reason` say which and why.

    Args:
        filters: int >= 1 (not a bool), the number of output filters.
        kernel_size: int or tuple of 2 ints (not a string), the kernel's
            height and width, each >= 1.
        strides: int or pair of ints. Defaults to `1`.
        padding: `"valid"` or `"same"` (case-insensitive), as in `Conv2D`.
        data_format: `"channels_last"` (default) or `"channels_first"`.
        dilation_rate: int or pair of ints. Defaults to `1`. Cannot exceed 1
            together with `strides`, as in `Conv2D`.
        base_filters: int in `[1, filters]`, the number of learned bases.
        base_ratio: float in `(0, 1]`, `base_filters / filters`; give this or
            `base_filters`, not both. With the default assignment both may be
            omitted: then `base_filters = filters / len(transforms)`.
        transforms: a preset (`"rotations"` (default), `"d4"`, `"flips"`,
            `"shifts"`, `"all"`), a transform name or a list of names.
            Transforms that need a square kernel are refused for another,
            and so are those that would build zero filters or copies on
            this kernel (`ops.transforms.degenerate_reason`: shifts or
            rotations of a 1x1 kernel, `flip_v` of a 1xk one).
        transform_family: `"discrete"` (default), `"scalar"`, `"rotation"`,
            `"affine"` or `"general"`.
        templates: optional bool array `(filters,)` or
            `(depth_groups, filters)`, for a learned family: the outputs
            whose operator stays `T_{t(o)}` (they learn no parameters). By
            default each base's first output under `identity` in each depth
            group (`ops.layout.template_outputs`). Conversion and pruning pass the kept
            filters.
        assignment: optional int array `(filters, 2)` or
            `(depth_groups, filters, 2)` of `(base, transform)` per output
            (and per depth group), `transform` indexing `transforms`. When
            omitted, output `o` takes base `o % base_filters` under transform
            `(o // base_filters) % len(transforms)`: block `j` holds every
            base under transform `j`. The discrete family needs
            `filters == base_filters * len(transforms)` for it, a learned
            family any multiple of `base_filters`.
        scale: bool, whether each output filter has a trainable scale
            (initialised by `scale_initializer`). Defaults to `False`.
        depth_groups: int, the number of input channel groups with their
            own assignment. Defaults to `1`.
        implementation: `"auto"` (default), `"materialized"` or `"factored"`.
        activation: activation function, as in `Conv2D`. Defaults to `None`.
        use_bias: bool, whether to add a bias. Defaults to `True`.
        kernel_initializer: initializer of the base kernel. Defaults to
            `"glorot_uniform"`. (The transform parameters start at the
            identity operator.)
        bias_initializer: initializer of the bias. Defaults to `"zeros"`.
        scale_initializer: initializer of the scale. Defaults to `"ones"`.
        kernel_regularizer: optional regularizer of the base kernel.
        bias_regularizer: optional regularizer of the bias.
        scale_regularizer: optional regularizer of the scale.
        transform_regularizer: optional regularizer of a learned family's
            transform parameters.
        activity_regularizer: optional regularizer of the output.
        kernel_constraint: optional constraint on the base kernel.
        bias_constraint: optional constraint on the bias.
        scale_constraint: optional constraint on the scale.
        transform_constraint: optional constraint on the transform
            parameters.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, rows, cols, channels)` (`channels_last`) or
        `(batch, channels, rows, cols)` (`channels_first`).

    Output shape:
        4D tensor `(batch, new_rows, new_cols, filters)` (`channels_last`) or
        `(batch, filters, new_rows, new_cols)`, sized as by `Conv2D`.

    Returns:
        `activation(conv2d(inputs, materialized_kernel()) + bias)`.

    Raises:
        ValueError: for arguments out of range or inconsistent with each
            other (`scale` and `use_bias` must be bools), and for inputs
            that are not 4D, whose channels do not divide into
            `depth_groups`, or whose static spatial size gives an output
            size <= 0 (an input smaller than the dilated kernel with
            `"valid"` padding), at build, in `compute_output_shape` and when
            called, as `Conv2D`.

    Example:

    >>> import numpy as np
    >>> layer = TransformConv2D(8, 3, base_filters=2, transforms="rotations")
    >>> tuple(layer(np.zeros((1, 5, 5, 3), "float32")).shape)
    (1, 3, 3, 8)
    >>> tuple(layer.base_kernel.shape)
    (3, 3, 3, 2)
    >>> tuple(layer.materialized_kernel().shape)
    (3, 3, 3, 8)
    >>> learned = TransformConv2D(8, 3, base_filters=2, transform_family="scalar")
    >>> _ = learned(np.zeros((1, 5, 5, 3), "float32"))
    >>> tuple(learned.transform.shape)  # 9 multipliers for each of 6 transformed filters
    (9, 6)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        base_filters=None,
        base_ratio=None,
        transforms="rotations",
        assignment=None,
        scale=False,
        depth_groups=1,
        implementation="auto",
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        scale_initializer="ones",
        kernel_regularizer=None,
        bias_regularizer=None,
        scale_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        scale_constraint=None,
        transform_family="discrete",
        templates=None,
        transform_regularizer=None,
        transform_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.filters = check_positive_int(filters, "filters")
        self.kernel_size = _standardize_pair(kernel_size, "kernel_size")
        self.strides = _standardize_pair(strides, "strides")
        self.dilation_rate = _standardize_pair(dilation_rate, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` is not supported together with "
                f"`dilation_rate > 1` (as in Conv2D). Received "
                f"strides={self.strides} and dilation_rate={self.dilation_rate}."
            )
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(
                "Invalid value for argument `padding`. Expected 'valid' or "
                f"'same'. Received padding={padding!r}."
            )
        self.padding = padding.lower()
        self.data_format = _standardize_data_format(data_format)
        self._geometry = factored_lib.Geometry(
            self.kernel_size, self.strides, self.dilation_rate, self.padding
        )
        self.transforms = transforms_lib.resolve_transforms(
            transforms, self.kernel_size
        )
        degenerate = transforms_lib.degenerate_reason(self.transforms, self.kernel_size)
        if degenerate:
            raise ValueError(
                f"Invalid value for argument `transforms`: {degenerate}. Pass transforms "
                f"whose tap tables differ on this kernel (e.g. transforms='identity' for "
                f"a 1x1 kernel). Received "
                f"transforms={list(self.transforms)}, kernel_size={self.kernel_size}."
            )
        self.transform_family = families_lib.check_family(transform_family)
        self.depth_groups = check_positive_int(depth_groups, "depth_groups")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                "Invalid value for argument `implementation`. Expected one of "
                f"{list(IMPLEMENTATIONS)}. Received "
                f"implementation={implementation!r}."
            )
        self.implementation = implementation
        self._base_filters_arg = base_filters
        self._base_ratio_arg = base_ratio
        self._assignment_arg = assignment
        self.base_filters = layout_lib.resolve_base_filters(
            self.filters, self.transforms, base_filters, base_ratio, assignment
        )
        self._assignment = layout_lib.resolve_assignment(
            assignment, self.filters, self.base_filters, self.transforms, self.depth_groups,
            self.transform_family,
        )
        self._templates_arg = templates
        self._templates = layout_lib.resolve_templates(
            templates, self._assignment, self.transforms, self.transform_family
        )
        self.scale = check_bool(scale, "scale")
        self.activation = keras.activations.get(activation)
        self.use_bias = check_bool(use_bias, "use_bias")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.scale_initializer = keras.initializers.get(scale_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.scale_regularizer = keras.regularizers.get(scale_regularizer)
        self.transform_regularizer = keras.regularizers.get(transform_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.scale_constraint = keras.constraints.get(scale_constraint)
        self.transform_constraint = keras.constraints.get(transform_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.implementation_used = None
        self.implementation_reason = None
        self._train_factored = False
        self._warned_unfused = False

    # ------------------------------------------------------------------
    # Argument resolution

    @property
    def assignment(self):
        """The `(depth_groups, filters, 2)` table of `(base, transform)` per output."""
        table = self._assignment.copy()
        table.flags.writeable = False
        return table

    @property
    def templates(self):
        """`(depth_groups, filters)` bool: the outputs that learn no transform.

        For the discrete family, every output. For a learned family, each
        base's first output under `identity` in each depth group; the other
        outputs are the transformed filters, one row of `transform` each, in
        (group, filter) order.
        """
        mask = self._templates.copy()
        mask.flags.writeable = False
        return mask

    @property
    def num_transformed(self):
        """The number of (depth group, filter) pairs with a learned transform."""
        return int((~self._templates).sum())

    # ------------------------------------------------------------------
    # Keras layer API

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "TransformConv2D expects 4D inputs (batch, rows, cols, "
                f"channels). Received input_shape={input_shape}."
            )
        channel_axis = -1 if self.data_format == "channels_last" else 1
        channels = input_shape[channel_axis]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be defined. Received "
                f"input_shape={input_shape}."
            )
        if channels % self.depth_groups:
            raise ValueError(
                f"The input channels ({channels}) must be divisible by "
                f"depth_groups={self.depth_groups} in layer '{self.name}'. "
                f"Received input_shape={input_shape}."
            )
        self._check_output_size(input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={channel_axis: channels})
        kh, kw = self.kernel_size
        self.base_kernel = self.add_weight(
            name="base_kernel",
            shape=(kh, kw, channels, self.base_filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            trainable=True,
            dtype=self.dtype,
        )
        self.scale_weight = None
        if self.scale:
            self.scale_weight = self.add_weight(
                name="scale",
                shape=(self.filters,),
                initializer=self.scale_initializer,
                regularizer=self.scale_regularizer,
                constraint=self.scale_constraint,
                trainable=True,
                dtype=self.dtype,
            )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                trainable=True,
                dtype=self.dtype,
            )
        self.transform = None
        if self.num_transformed:
            identity = families_lib.identity_params(self.transform_family, self.kernel_size)
            # Parameters-major: one column per transformed filter, so the
            # scalar multipliers of consecutive filters are contiguous.
            self.transform = self.add_weight(
                name="transform",
                shape=(len(identity), self.num_transformed),
                initializer=keras.initializers.Constant(
                    np.tile(identity[:, None], (1, self.num_transformed))
                ),
                regularizer=self.transform_regularizer,
                constraint=self.transform_constraint,
                trainable=True,
                dtype=self.dtype,
            )
        self._tables = layout_lib.index_tables(
            self._assignment, self.transforms, self.kernel_size, self.base_filters,
            self._templates, merge_identical=self.transform_family == "discrete",
        )
        self.implementation_used, self.implementation_reason = (
            self.choose_implementation(tuple(input_shape))
        )

    def _check_output_size(self, input_shape):
        """Raises, as `Conv2D` does, when the static spatial size leaves no output."""
        if len(input_shape) != 4:
            return  # the rank is checked where the shape is used
        if self.data_format == "channels_last":
            h, w = input_shape[1], input_shape[2]
        else:
            h, w = input_shape[2], input_shape[3]
        out = self._output_spatial(h, w)
        if any(size is not None and size <= 0 for size in out):
            dilated = tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation_rate))
            raise ValueError(
                f"Computed output size would be zero or negative for layer '{self.name}': "
                f"output {out} from the input's spatial size {(h, w)} with "
                f"kernel_size={self.kernel_size} (dilated to {dilated}), "
                f"strides={self.strides}, dilation_rate={self.dilation_rate} and "
                f"padding='{self.padding}'. Received input_shape={tuple(input_shape)}; "
                "use padding='same' or a larger input."
            )

    def cost(self, input_shape):
        """Multiply-adds of both paths for one sample of `input_shape` (no batch).

        Returns:
            A dict with `output_shape` (as `compute_output_shape`, without
            batch), `dense_macs` (the materialised convolution),
            `factored_macs` (the base products, over the padded input where
            the factored path pads it), `factored_adds` (the discrete
            family's shifted additions, `kh * kw * depth_groups` per output
            value, less the taps a shift zeroes) and `transform_macs` (a
            learned family's second stage instead: a multiply-add per tap
            (scalar) or per pair of taps (rotation, affine, general) that the
            factored path computes).
        """
        if len(input_shape) != 3:
            raise ValueError(
                "Expected the shape of one sample, (rows, cols, channels) or "
                f"(channels, rows, cols). Received input_shape={input_shape}."
            )
        output_shape = self.compute_output_shape((None,) + tuple(input_shape))[1:]
        if self.data_format == "channels_first":
            c, h, w = input_shape
        else:
            h, w, c = input_shape
        if None in (h, w, c):
            raise ValueError(
                f"cost() needs a fully known sample shape. Received input_shape={input_shape}."
            )
        oh, ow = self._output_spatial(h, w)
        taps = self.kernel_size[0] * self.kernel_size[1]
        (pad_h, pad_w), pad_input = self._geometry.padding_plan(h, w)
        if pad_input:
            h, w = h + sum(pad_h), w + sum(pad_w)
        kept = int((transforms_lib.tap_tables(self.transforms, self.kernel_size)[
            self._assignment[..., 1]] >= 0).sum())  # (group, filter, tap) terms
        terms = oh * ow * kept
        kind = self._coefficient_kind()
        return {
            "output_shape": output_shape,
            "dense_macs": oh * ow * taps * c * self.filters,
            "factored_macs": h * w * c * taps * self.base_filters,
            "factored_adds": terms if kind is None else 0,
            "transform_macs": 0 if kind is None else terms * (taps if kind == "dense" else 1),
        }

    def choose_implementation(self, input_shape):
        """The path `"auto"` runs for `input_shape` (with batch), and why.

        With `"auto"`, a layer whose shapes favour the factored path runs it
        for inference under XLA (`compile(jit_compile=True)`,
        `tf.function(jit_compile=True)`, the JAX backend), and for training
        steps under XLA too when its depth groups are wide and its outputs
        need no reordering; otherwise, and always without XLA, the
        materialised path. The measurements: docs/benchmarks/layer_speed.md.

        Returns:
            `(implementation, reason)`: `"factored"` when the factored path is
            chosen for inference under XLA, else `"materialized"`;
            `("<requested>", "requested")` when `implementation` is not
            `"auto"`.
        """
        if self.implementation != "auto":
            return self.implementation, "requested"
        if self.data_format == "channels_last":
            h, w, channels = input_shape[1:]
        else:
            channels, h, w = input_shape[1:]
        if h is None or w is None:
            return "materialized", (
                "spatial size unknown at build; the factored path needs it"
            )
        sh, sw = self.strides
        taps = self.kernel_size[0] * self.kernel_size[1]
        fraction = sh * sw * self.base_filters / self.filters
        group_channels = channels // self.depth_groups
        product_bytes = h * w * taps * self.base_filters * self.depth_groups * 4
        checks = [
            (fraction <= AUTO_MAX_PRODUCT_FRACTION,
             f"products/dense multiply-adds {fraction:.3g} (<= {AUTO_MAX_PRODUCT_FRACTION:g})"),
            (group_channels >= AUTO_MIN_GROUP_CHANNELS,
             f"{group_channels} input channels per depth group (>= {AUTO_MIN_GROUP_CHANNELS})"),
            (product_bytes <= AUTO_MAX_PRODUCT_BYTES,
             f"products {product_bytes / 2**20:.2f} MiB per image "
             f"(<= {AUTO_MAX_PRODUCT_BYTES / 2**20:g})"),
        ]
        tables = getattr(self, "_tables", None)
        ordered = tables is not None and tables.plan.output_index is None
        if self._coefficient_kind() == "dense":
            checks.append((
                group_channels >= AUTO_MIN_DENSE_OPERATOR_CHANNELS,
                f"{self.transform_family} operators with {group_channels} channels per "
                f"group (>= {AUTO_MIN_DENSE_OPERATOR_CHANNELS})",
            ))
            # Scattered outputs take the gathered sums, (kh*kw)**2 terms each:
            # measured 5-9x the dense model's training step.
            checks.append((
                ordered or tables is None,
                f"{self.transform_family} operators on "
                + ("contiguous outputs" if ordered or tables is None else "scattered outputs"),
            ))
        choice = "factored" if all(ok for ok, _ in checks) else "materialized"
        # Training steps too, under XLA, where the factored forward saves more
        # than building the kernel for the dense gradient costs: wide groups
        # whose outputs need no final reordering (an assignment fitted by
        # conversion or pruning scatters them, and then measured slower).
        self._train_factored = (
            choice == "factored"
            and group_channels >= AUTO_MIN_TRAINING_GROUP_CHANNELS
            and ordered
        )
        if choice == "materialized":
            where = "materialized"
        elif self._train_factored:
            where = "factored under XLA (inference and training), materialized without XLA"
        else:
            why = (f"< {AUTO_MIN_TRAINING_GROUP_CHANNELS} channels per group" if ordered
                   or group_channels < AUTO_MIN_TRAINING_GROUP_CHANNELS
                   else "outputs reordered")
            where = (f"factored for inference under XLA; materialized without XLA and for "
                     f"training ({why})")
        reason = "; ".join(("" if ok else "NOT ") + text for ok, text in checks)
        return choice, f"{reason}: {where}"

    def _output_spatial(self, h, w):
        return self._geometry.output_size(h, w)

    def compute_output_shape(self, input_shape):
        self._check_output_size(input_shape)
        if self.data_format == "channels_last":
            batch, h, w, _ = input_shape
            oh, ow = self._output_spatial(h, w)
            return (batch, oh, ow, self.filters)
        batch, _, h, w = input_shape
        oh, ow = self._output_spatial(h, w)
        return (batch, self.filters, oh, ow)

    # ------------------------------------------------------------------
    # The kernel and the transform operators

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"{what} needs a built layer: call the layer on an input (or "
                "call build(input_shape)) first."
            )

    def _coefficient_kind(self):
        """How the learned operators enter the sums: None, "diagonal" or "dense"."""
        return families_lib.coefficient_kind(self.transform_family)

    def transform_parameters(self, dtype=None):
        """`(depth_groups, filters, p)`: every output's family parameters.

        Templates hold the identity parameters; the transformed filters the
        columns of `transform`. None for the discrete family.
        """
        self._check_built("transform_parameters()")
        if self.transform_family == "discrete":
            return None
        params = self._params_major(dtype or self.variable_dtype)  # (p, g, f)
        return ops.transpose(params, (1, 2, 0))

    def _params_major(self, dtype):
        """`(p, depth_groups, filters)`: `transform_parameters`, parameters first.

        Built from runs of consecutive filters (identity columns for the
        templates, slices of `transform` for the others) where the templates
        allow few runs, else by one gather; either way consecutive filters
        stay contiguous, which the factored sums need to run at speed (XLA
        kept a gathered-then-transposed table filters-first inside the sums,
        1.4-1.7x slower).
        """
        identity = families_lib.identity_params(self.transform_family, self.kernel_size)
        variable = None if self.transform is None else ops.cast(self.transform, dtype)
        p, g, f = len(identity), self.depth_groups, self.filters
        runs = self._tables.param_runs
        if runs is not None:
            pieces = []
            for start, stop, column in runs:
                if column is None:
                    pieces.append(ops.cast(np.tile(identity[:, None], (1, stop - start)), dtype))
                else:
                    pieces.append(variable[:, column:column + stop - start])
            params = pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=1)
        else:
            table = ops.cast(identity[:, None], dtype)
            if variable is not None:
                table = ops.concatenate([table, variable], axis=1)
            params = ops.take(table, self._tables.param_rows, axis=1)
        return ops.reshape(params, (p, g, f))

    def _coefficients(self, dtype):
        """The learned part of every operator, as both paths use it (filters last).

        None (discrete); the multipliers `(g, taps, f)` (scalar); or the
        operators `L` as `(g, taps, taps, f)` (rotation, affine, general)
        (`ops.families.coefficients`). Computed in float32 at least (the
        sampling weights need the precision; float64 for a float64 layer),
        then cast to `dtype`.
        """
        if self.transform_family == "discrete":
            return None
        work = "float64" if dtype == "float64" else "float32"
        if self.transform_family == "scalar":  # the multipliers, as stored
            return ops.cast(ops.transpose(self._params_major(work), (1, 0, 2)), dtype)
        params = self.transform_parameters(work)
        return ops.cast(
            families_lib.coefficients(self.transform_family, params, self.kernel_size), dtype
        )

    def transform_operators(self):
        """`(depth_groups, filters, taps, taps)`: each output's tap operator `S_o`.

        `S_o = L(phi_o) @ T_{t(o)}` (without the output scale): the
        materialised kernel is `scale[o] * S_o @ B[..., b(o)]` on the taps,
        per input channel.
        """
        self._check_built("transform_operators()")
        kh, kw = self.kernel_size
        taps = kh * kw
        permutation = np.zeros((self.depth_groups, self.filters, taps, taps), np.float32)
        g, o, u = np.nonzero(self._tables.tap_sources >= 0)
        permutation[g, o, u, self._tables.tap_sources[g, o, u]] = 1.0
        params = self.transform_parameters("float32")
        if params is None:
            return ops.convert_to_tensor(permutation)
        operators = families_lib.operators(self.transform_family, params, self.kernel_size)
        return ops.matmul(operators, permutation)

    def materialized_kernel(self, dtype=None):
        """The equivalent `Conv2D` kernel `(kh, kw, c_in, filters)`.

        Args:
            dtype: dtype of the result; defaults to the variable dtype.
        """
        self._check_built("materialized_kernel()")
        dtype = dtype or self.base_kernel.dtype
        return self._materialize(
            self._bases(dtype),
            self._coefficients(dtype),
            None if self.scale_weight is None else ops.cast(self.scale_weight, dtype),
        )

    def _bases(self, dtype):
        """The base filters `(kh, kw, c_in, base_filters)` in `dtype`, as both paths use them.

        The `base_kernel` weight here; a subclass that stores its bases in
        another form (`layers.FilterBasisTransformConv2D`) builds them.
        """
        return ops.cast(self.base_kernel, dtype)

    def _materialize(self, base, coefficients, scale):
        return families_lib.materialize(
            base, self._tables.materialize, coefficients, self.transform_family, scale,
            self.filters, self.depth_groups,
        )

    # ------------------------------------------------------------------
    # Execution

    def _conv_kwargs(self):
        return dict(
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format="channels_last",
        )

    def call(self, inputs, training=None):
        return self._call_with_bases(inputs, self._bases(self.compute_dtype), training)

    def _call_with_bases(self, inputs, base, training=None):
        """The layer's output with `base` (compute dtype) in place of its bases.

        `call` passes its own; a wrapper that computes the bases from other
        weights (`pruning.InterspacePruning`) passes those, and both
        execution paths run as for the layer's own.
        """
        # Built for an unknown spatial size: check the size it runs on.
        self._check_output_size(tuple(inputs.shape))
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        dtype = self.compute_dtype
        coefficients = self._coefficients(dtype)
        scale = None if self.scale_weight is None else ops.cast(self.scale_weight, dtype)
        bias = None if self.bias is None else ops.cast(self.bias, dtype)
        if not self._runs_factored(training):
            kernel = self._materialize(base, coefficients, scale)
            y = ops.conv(x, kernel, **self._conv_kwargs())
            if bias is not None:
                y = y + bias
        else:
            extras = [base] + [t for t in (coefficients, scale, bias) if t is not None]
            if training and factored_lib.supports_dense_gradient():
                kernel = self._materialize(base, coefficients, scale)
                y = factored_lib.dense_gradient(
                    self._factored_forward, x, kernel, extras, self._conv_kwargs(),
                    bias=bias is not None,
                )
            else:
                y = self._factored_forward(x, *extras)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        if self.activation is not None:
            y = self.activation(y)
        return y

    def _runs_factored(self, training):
        """Whether this call runs the factored path (see `choose_implementation`)."""
        if self.implementation_used != "factored":
            return False
        if self.implementation == "factored":
            if training and not self._warned_unfused and not _compat.compiled_by_xla():
                self._warned_unfused = True
                warnings.warn(
                    f"TransformConv2D '{self.name}' trains with implementation='factored' "
                    "without XLA: each shifted slice and addition runs as its own "
                    "operation, measured 2-8x slower than the materialised path and, for "
                    "the rotation, affine and general families, 3.5x the dense model's "
                    "memory. Compile with jit_compile=True, or use "
                    "implementation='auto' (materialised without XLA).",
                    stacklevel=3,
                )
            return True
        return _compat.compiled_by_xla() and (not training or self._train_factored)

    def _factored_forward(self, x, base, *extras):
        """The factored path on channels-last `x` (`ops.factored.forward`).

        `extras` are, in this order and where the layer has them, the
        coefficients of the learned operators, the scale and the bias (cast
        to the compute dtype).
        """
        extras = list(extras)
        kind = self._coefficient_kind()
        return factored_lib.forward(
            x, base, self._tables, self._geometry, self.depth_groups,
            coefficients=extras.pop(0) if kind is not None else None,
            kind=kind,
            scale=extras.pop(0) if self.scale_weight is not None else None,
            bias=extras.pop(0) if self.bias is not None else None,
        )

    def get_config(self):
        config = super().get_config()
        assignment = self._assignment_arg
        if assignment is not None:
            assignment = np.asarray(assignment).tolist()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "base_filters": self._base_filters_arg,
                "base_ratio": self._base_ratio_arg,
                "transforms": list(self.transforms),
                "transform_family": self.transform_family,
                "templates": (
                    None if self._templates_arg is None
                    else np.asarray(self._templates_arg).tolist()
                ),
                "assignment": assignment,
                "scale": self.scale,
                "depth_groups": self.depth_groups,
                "implementation": self.implementation,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "scale_initializer": keras.initializers.serialize(self.scale_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "scale_regularizer": keras.regularizers.serialize(self.scale_regularizer),
                "transform_regularizer": keras.regularizers.serialize(
                    self.transform_regularizer
                ),
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "scale_constraint": keras.constraints.serialize(self.scale_constraint),
                "transform_constraint": keras.constraints.serialize(
                    self.transform_constraint
                ),
            }
        )
        return config
