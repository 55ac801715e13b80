"""`TransformConv2D`: a convolution whose filters are spatial transforms of a few bases."""


import keras
import numpy as np
from keras import ops

from tf_transform_conv import transforms as transforms_lib

IMPLEMENTATIONS = ("auto", "materialized", "factored")

# `implementation="auto"` runs the factored path for inference when three
# measured conditions hold (`benchmarks/layer_speed.py`, XLA on a 2-core CPU;
# see the README): the base products are at most a quarter of the dense
# multiply-adds (`strides**2 * base_filters / filters <= 1/4`: at 1/2 the
# additions eat the saving), each depth group sees at least 16 input channels
# (the additions per output pixel, `kh*kw*filters*depth_groups`, stay small
# against the products), and the per-image product tensor `P` fits in
# `AUTO_MAX_PRODUCT_BYTES` (beyond it the additions stream `P` from main
# memory and lose). Training steps run factored only with at least
# `AUTO_MIN_TRAINING_GROUP_CHANNELS` channels per group: the factored
# gradient (pads and adds of every shifted slice) costs 1.3-2.7x the
# materialised step below that, and 0.25-0.6x of it from 256 channels up.
AUTO_MAX_PRODUCT_FRACTION = 0.25
AUTO_MIN_GROUP_CHANNELS = 16
AUTO_MIN_TRAINING_GROUP_CHANNELS = 64
AUTO_MAX_PRODUCT_BYTES = 1 << 20
# The factored path pads the input before the products (no bounds checks in
# the additions) unless that grows the products by more than this factor; then
# it pads the products instead.
_MAX_INPUT_PAD_GROWTH = 1.25
# Above this many slices per call, the factored additions gather channels
# with `take` per tap instead of slicing contiguous output segments.
_MAX_SLICES = 512


def _standardize_pair(value, name):
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        value = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected `{name}` to be an int or a pair of ints. "
            f"Received {name}={value!r}."
        ) from None
    if len(value) != 2 or min(value) < 1:
        raise ValueError(
            f"Expected `{name}` to be a strictly positive int or a pair of "
            f"strictly positive ints. Received {name}={value!r}."
        )
    return value


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


def default_assignment(filters, base_filters, num_transforms, depth_groups=1):
    """The default assignment: block `j` of outputs holds every base under transform `j`.

    Returns:
        An int32 array `(depth_groups, filters, 2)` of `(base, transform)`.
    """
    if filters != base_filters * num_transforms:
        raise ValueError(
            "The default assignment needs filters == base_filters * "
            f"len(transforms). Received filters={filters}, "
            f"base_filters={base_filters} and {num_transforms} transforms "
            f"(= {base_filters * num_transforms} filters)."
        )
    o = np.arange(filters)
    table = np.stack([o % base_filters, o // base_filters], axis=-1)
    return np.broadcast_to(table, (depth_groups, filters, 2)).astype(np.int32)


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class TransformConv2D(keras.layers.Layer):
    """2D convolution whose filters are cheap spatial transforms of a few bases.

    The layer learns only `base_filters` kernels `B` of shape
    `(kh, kw, c_in, base_filters)` and computes exactly what
    `keras.layers.Conv2D` computes with the *materialised* kernel

        W[..., o] = scale[o] * T_{t(o)}(B[..., b(o)])

    where the *assignment* gives each output filter `o` a base `b(o)` and a
    transform `t(o)` (rotation, mirror or one-tap shift; see
    `tf_transform_conv.transforms`). With `depth_groups=g` the input channels
    are split into `g` contiguous groups, each with its own assignment.
    Parameters fall by `base_filters / filters` against `Conv2D`; with the
    factored execution the multiply-adds fall by the same factor.

    Reference: R. Miles, K. Mikolajczyk, "Reconstructing Pruned Filters using
    Cheap Spatial Transformations", ICCV Workshops 2023 (arXiv 2110.12844).

    Two execution paths give the same result:

    - `"materialized"`: gather `W` from `B`, then one ordinary convolution.
      Multiply-adds equal the dense layer's; fastest to train on accelerators.
    - `"factored"`: `P = x @ B` per tap (the base convolution's products,
      computed once), then each output sums `kh * kw` shifted channels of
      `P`. Multiply-adds are the base convolution's, plus
      `H' * W' * filters * kh * kw * depth_groups` additions.
    - `"auto"` picks the cheaper one from the shapes when the layer is built;
      `implementation_used` and `implementation_reason` say which and why.

    Args:
        filters: int, the number of output filters.
        kernel_size: int or pair of ints, the kernel's height and width.
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
            `"shifts"`, `"all"`) or a list of transform names.
        assignment: optional int array `(filters, 2)` or
            `(depth_groups, filters, 2)` of `(base, transform)` per output
            (and per depth group), `transform` indexing `transforms`. When
            omitted, output block `j` holds every base under transform `j`,
            which needs `filters == base_filters * len(transforms)`.
        scale: bool, whether each output filter has a trainable scale
            (initialised by `scale_initializer`). Defaults to `False`.
        depth_groups: int, the number of input channel groups with their
            own assignment. Defaults to `1`.
        implementation: `"auto"` (default), `"materialized"` or `"factored"`.
        activation: activation function, as in `Conv2D`. Defaults to `None`.
        use_bias: bool, whether to add a bias. Defaults to `True`.
        kernel_initializer, bias_initializer, scale_initializer: initializers
            for the base kernel, bias and scale.
        kernel_regularizer, bias_regularizer, scale_regularizer,
        activity_regularizer: optional regularizers.
        kernel_constraint, bias_constraint, scale_constraint: optional
            constraints.
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
            other, and for inputs that are not 4D or whose channels do not
            divide into `depth_groups`.

    Example:

    >>> import numpy as np
    >>> layer = TransformConv2D(8, 3, base_filters=2, transforms="rotations")
    >>> tuple(layer(np.zeros((1, 5, 5, 3), "float32")).shape)
    (1, 3, 3, 8)
    >>> tuple(layer.base_kernel.shape)
    (3, 3, 3, 2)
    >>> tuple(layer.materialized_kernel().shape)
    (3, 3, 3, 8)
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
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not isinstance(filters, (int, np.integer)) or filters < 1:
            raise ValueError(
                "Invalid value for argument `filters`. Expected a strictly "
                f"positive int. Received filters={filters!r}."
            )
        self.filters = int(filters)
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
        self.transforms = transforms_lib.resolve_transforms(
            transforms, self.kernel_size
        )
        if not isinstance(depth_groups, (int, np.integer)) or depth_groups < 1:
            raise ValueError(
                "Invalid value for argument `depth_groups`. Expected a "
                f"strictly positive int. Received depth_groups={depth_groups!r}."
            )
        self.depth_groups = int(depth_groups)
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
        self.base_filters = self._resolve_base_filters(base_filters, base_ratio, assignment)
        self._assignment = self._resolve_assignment(assignment)
        self.scale = bool(scale)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.scale_initializer = keras.initializers.get(scale_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.scale_regularizer = keras.regularizers.get(scale_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.scale_constraint = keras.constraints.get(scale_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.implementation_used = None
        self.implementation_reason = None
        self._train_factored = False

    # ------------------------------------------------------------------
    # Argument resolution

    def _resolve_base_filters(self, base_filters, base_ratio, assignment):
        if base_filters is not None and base_ratio is not None:
            raise ValueError(
                "Pass either `base_filters` or `base_ratio`, not both. Received "
                f"base_filters={base_filters} and base_ratio={base_ratio}."
            )
        if base_ratio is not None:
            if not isinstance(base_ratio, (int, float, np.floating, np.integer)) or not (
                0 < base_ratio <= 1
            ):
                raise ValueError(
                    "Invalid value for argument `base_ratio`. Expected a number "
                    f"in (0, 1]. Received base_ratio={base_ratio!r}."
                )
            exact = self.filters * float(base_ratio)
            base_filters = int(round(exact))
            if base_filters < 1 or abs(exact - base_filters) > 1e-6:
                raise ValueError(
                    f"`base_ratio` * `filters` must be a whole number of base "
                    f"filters. Received base_ratio={base_ratio} with "
                    f"filters={self.filters} (= {exact:g} bases); pass "
                    f"base_filters= instead."
                )
        elif base_filters is None:
            if assignment is not None:
                raise ValueError(
                    "An explicit `assignment` needs the number of base filters: "
                    "pass `base_filters` or `base_ratio`."
                )
            num = len(self.transforms)
            if self.filters % num:
                raise ValueError(
                    f"The default assignment needs `filters` divisible by "
                    f"len(transforms). Received filters={self.filters} and "
                    f"{num} transforms {list(self.transforms)}; pass "
                    f"base_filters and an explicit assignment, or other "
                    f"transforms."
                )
            return self.filters // num
        if not isinstance(base_filters, (int, np.integer)) or not (
            1 <= base_filters <= self.filters
        ):
            raise ValueError(
                "Invalid value for argument `base_filters`. Expected an int in "
                f"[1, filters={self.filters}]. Received "
                f"base_filters={base_filters!r}."
            )
        return int(base_filters)

    def _resolve_assignment(self, assignment):
        g, f, n, t = (
            self.depth_groups,
            self.filters,
            self.base_filters,
            len(self.transforms),
        )
        if assignment is None:
            if f != n * t:
                raise ValueError(
                    "The default assignment needs filters == base_filters * "
                    f"len(transforms). Received filters={f}, base_filters={n} "
                    f"and {t} transforms {list(self.transforms)} (= {n * t}). "
                    "Choose base_filters=filters/len(transforms), other "
                    "transforms, or pass an explicit assignment."
                )
            return default_assignment(f, n, t, g)
        table = np.asarray(assignment)
        if table.dtype.kind not in "iu" and table.size:
            raise ValueError(
                "Expected `assignment` to hold integers (base, transform) per "
                f"output. Received an array of dtype {table.dtype}."
            )
        if table.shape == (f, 2):
            table = np.broadcast_to(table, (g, f, 2))
        if table.shape != (g, f, 2):
            raise ValueError(
                f"Expected `assignment` of shape (filters, 2) = ({f}, 2) or "
                f"(depth_groups, filters, 2) = ({g}, {f}, 2). Received shape "
                f"{table.shape}."
            )
        bases, trans = table[..., 0], table[..., 1]
        if bases.min() < 0 or bases.max() >= n:
            raise ValueError(
                f"`assignment` base indices must lie in [0, base_filters={n}). "
                f"Received indices in [{bases.min()}, {bases.max()}]."
            )
        if trans.min() < 0 or trans.max() >= t:
            raise ValueError(
                f"`assignment` transform indices must lie in [0, {t}) for "
                f"transforms {list(self.transforms)}. Received indices in "
                f"[{trans.min()}, {trans.max()}]."
            )
        return table.astype(np.int32)

    @property
    def assignment(self):
        """The `(depth_groups, filters, 2)` table of `(base, transform)` per output."""
        table = self._assignment.copy()
        table.flags.writeable = False
        return table

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
                f"depth_groups={self.depth_groups}. Received "
                f"input_shape={input_shape}."
            )
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
        self._build_tables(channels)
        self.implementation_used, self.implementation_reason = (
            self.choose_implementation(tuple(input_shape))
        )

    def _build_tables(self, channels):
        """Static index tables for both execution paths."""
        kh, kw = self.kernel_size
        taps, g, n = kh * kw, self.depth_groups, self.base_filters
        src = transforms_lib.tap_tables(self.transforms, self.kernel_size)  # (T, taps)
        bases, trans = self._assignment[..., 0], self._assignment[..., 1]  # (g, f)
        src_of = src[trans]  # (g, f, taps): base tap landing on tap u
        src_of = np.transpose(src_of, (2, 0, 1))  # (taps, g, f)
        group = np.arange(g).reshape(1, g, 1)
        # Rows of the (taps, g, n) base table, in that order; `taps*g*n` is
        # the appended zero row.
        rows = (src_of * g + group) * n + bases[None]
        self._materialize_index = np.where(src_of >= 0, rows, taps * g * n).astype(
            np.int32
        )
        # Channels of the factored product P, laid out (group, tap, base).
        chans = (group * taps + src_of) * n + bases[None]
        self._factored_index = np.where(src_of >= 0, chans, -1).astype(np.int32)
        self._factored_plan = _plan_segments(self._factored_index)

    def cost(self, input_shape):
        """Multiply-adds of both paths for one sample of `input_shape` (no batch).

        Returns:
            A dict with `output_shape` (as `compute_output_shape`, without
            batch), `dense_macs` (the materialised convolution),
            `factored_macs` (the base products, over the padded input where
            the factored path pads it) and `factored_adds` (its shifted
            additions, `kh * kw * depth_groups` per output value).
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
        (pad_h, pad_w), pad_input = self._factored_padding(h, w)
        if pad_input:
            h, w = h + sum(pad_h), w + sum(pad_w)
        return {
            "output_shape": output_shape,
            "dense_macs": oh * ow * taps * c * self.filters,
            "factored_macs": h * w * c * taps * self.base_filters,
            "factored_adds": oh * ow * self.filters * taps * self.depth_groups,
        }

    def _factored_padding(self, h, w):
        """`((top, bottom), (left, right))` and whether to pad the input (else the products)."""
        if self.padding == "valid":
            return ((0, 0), (0, 0)), False
        oh, ow = self._output_spatial(h, w)
        pads = []
        for size, out, k, s, d in zip(
            (h, w), (oh, ow), self.kernel_size, self.strides, self.dilation_rate
        ):
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        growth = (h + sum(pads[0])) * (w + sum(pads[1])) / (h * w)
        return tuple(pads), growth <= _MAX_INPUT_PAD_GROWTH

    def choose_implementation(self, input_shape):
        """The path `"auto"` runs for `input_shape` (with batch), and why.

        Returns:
            `(implementation, reason)`; `("<requested>", "requested")` when
            `implementation` is not `"auto"`.
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
        choice = "factored" if all(ok for ok, _ in checks) else "materialized"
        self._train_factored = (
            choice == "factored" and group_channels >= AUTO_MIN_TRAINING_GROUP_CHANNELS
        )
        training = "factored" if self._train_factored else (
            "materialized" if choice == "materialized"
            else f"materialized (< {AUTO_MIN_TRAINING_GROUP_CHANNELS} channels per group)"
        )
        reason = "; ".join(
            ("" if ok else "NOT ") + text for ok, text in checks
        ) + f": {choice} for inference, {training} for training steps"
        return choice, reason

    def _output_spatial(self, h, w):
        out = []
        for size, k, s, d in zip((h, w), self.kernel_size, self.strides, self.dilation_rate):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // s))
            else:
                out.append((size - (k - 1) * d - 1) // s + 1)
        return tuple(out)

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_last":
            batch, h, w, _ = input_shape
            oh, ow = self._output_spatial(h, w)
            return (batch, oh, ow, self.filters)
        batch, _, h, w = input_shape
        oh, ow = self._output_spatial(h, w)
        return (batch, self.filters, oh, ow)

    def materialized_kernel(self, dtype=None):
        """The equivalent `Conv2D` kernel `(kh, kw, c_in, filters)`.

        Args:
            dtype: dtype of the result; defaults to the variable dtype.
        """
        if not self.built:
            raise ValueError(
                "materialized_kernel() needs a built layer: call the layer on "
                "an input (or call build(input_shape)) first."
            )
        dtype = dtype or self.base_kernel.dtype
        kh, kw = self.kernel_size
        taps, g, n = kh * kw, self.depth_groups, self.base_filters
        channels = self.base_kernel.shape[2]
        cg = channels // g
        base = ops.cast(self.base_kernel, dtype)
        table = ops.reshape(base, (taps, g, cg, n))
        table = ops.reshape(ops.transpose(table, (0, 1, 3, 2)), (taps * g * n, cg))
        table = ops.concatenate([table, ops.zeros((1, cg), dtype)], axis=0)
        kernel = ops.take(table, self._materialize_index, axis=0)  # (taps, g, f, cg)
        kernel = ops.transpose(kernel, (0, 1, 3, 2))
        kernel = ops.reshape(kernel, (kh, kw, channels, self.filters))
        if self.scale_weight is not None:
            kernel = kernel * ops.cast(self.scale_weight, dtype)
        return kernel

    def call(self, inputs, training=None):
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        factored = self.implementation_used == "factored" and not (
            training and self.implementation == "auto" and not self._train_factored
        )
        if factored:
            y = self._factored(x)
        else:
            y = ops.conv(
                x,
                self.materialized_kernel(self.compute_dtype),
                strides=self.strides,
                padding=self.padding,
                dilation_rate=self.dilation_rate,
                data_format="channels_last",
            )
        if self.bias is not None:
            y = y + ops.cast(self.bias, y.dtype)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        if self.activation is not None:
            y = self.activation(y)
        return y

    # ------------------------------------------------------------------
    # Factored execution

    def _factored(self, x):
        kh, kw = self.kernel_size
        h, w = x.shape[1], x.shape[2]
        if h is None or w is None:
            raise ValueError(
                "The factored implementation needs static spatial dimensions; "
                f"received inputs of shape {x.shape}. Use "
                "implementation='materialized' for inputs of unknown size."
            )
        oh, ow = self._output_spatial(h, w)
        (pad_h, pad_w), pad_input = self._factored_padding(h, w)
        padded = any(pad_h + pad_w)
        if padded and pad_input:
            x = ops.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
        products = self._products(x)
        if padded and not pad_input:
            products = ops.pad(products, ((0, 0), pad_h, pad_w, (0, 0)))

        (sh, sw), (dh, dw) = self.strides, self.dilation_rate
        windows = [
            products[
                :,
                i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                j * dw : j * dw + (ow - 1) * sw + 1 : sw,
                :,
            ]
            for i in range(kh)
            for j in range(kw)
        ]
        plan = self._factored_plan
        if plan.num_slices() <= _MAX_SLICES:
            out = _segment_sums(windows, plan)
        else:
            out = _gathered_sums(windows, self._factored_index)
        if out is None:  # every tap of every filter zeroed (shifts of a 1x1 kernel)
            out = ops.zeros(ops.shape(products)[:1] + (oh, ow, self.filters), products.dtype)
        elif plan.output_index is not None:
            out = ops.take(out, plan.output_index, axis=-1)
        if self.scale_weight is not None:
            out = out * ops.cast(self.scale_weight, out.dtype)
        return out

    def _products(self, x):
        """`P = x @ B` per depth group, channels laid out (group, tap, base)."""
        kh, kw = self.kernel_size
        taps, g, n = kh * kw, self.depth_groups, self.base_filters
        channels = self.base_kernel.shape[2]
        cg = channels // g
        base = ops.cast(self.base_kernel, self.compute_dtype)
        base = ops.reshape(base, (taps, g, cg, n))
        base = ops.reshape(ops.transpose(base, (1, 2, 0, 3)), (g, cg, taps * n))
        if g == 1:
            return ops.matmul(x, base[0])
        batch_shape = tuple(ops.shape(x)[:-1])
        products = ops.einsum("bhwgc,gcm->bhwgm", ops.reshape(x, batch_shape + (g, cg)), base)
        return ops.reshape(products, batch_shape + (g * taps * n,))

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
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "scale_constraint": keras.constraints.serialize(self.scale_constraint),
            }
        )
        return config


class _SegmentPlan:
    """How the factored path lays out its outputs.

    Outputs are deduplicated and reordered so that runs of them (*segments*)
    read, at every tap and depth group, a contiguous range of product
    channels: a segment's sum is then `kh * kw * depth_groups` slices added
    together, which XLA fuses into one loop. With the default assignment
    every transform block is one segment and no reordering is needed.

    Attributes:
        segments: list of `(entries, width)`; `entries[(u, k)]` is the first
            product channel of the segment at tap `u`, group `k` (absent when
            that tap is zero for the whole segment).
        output_index: int array mapping each output to its position in the
            concatenated segments, or None when that is the identity.
    """

    def __init__(self, segments, output_index):
        self.segments = segments
        self.output_index = output_index

    def num_slices(self):
        return sum(len(entries) for entries, _ in self.segments)


def _plan_segments(index):
    """Plans the factored additions for `index` `(taps, groups, filters)`."""
    taps, groups, filters = index.shape
    columns = index.reshape(taps * groups, filters).T  # one row per output
    unique, inverse = np.unique(columns, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)

    def signature(row):
        valid = row >= 0
        lead = int(row[valid][0]) if valid.any() else 0
        return tuple(np.where(valid, row - lead, -1).tolist()), lead

    # Group rows by signature (in order of first use, so the default
    # assignment keeps its order), then by leading channel.
    first_use = {}
    for o in range(filters):
        first_use.setdefault(signature(unique[inverse[o]])[0], o)

    def key(r):
        sig, lead = signature(unique[r])
        return first_use[sig], lead

    keyed = sorted(range(len(unique)), key=key)
    segments, position = [], np.empty(len(unique), np.int64)
    previous = None
    for slot, r in enumerate(keyed):
        sig, lead = signature(unique[r])
        if previous is not None and previous == (sig, lead - 1) and sig != (-1,) * len(sig):
            segments[-1][1] += 1
        else:
            entries = {
                divmod(col, groups): int(unique[r][col])
                for col in range(taps * groups)
                if unique[r][col] >= 0
            }
            segments.append([entries, 1])
        previous = (sig, lead)
        position[r] = slot
    output_index = position[inverse]
    if np.array_equal(output_index, np.arange(filters)):
        output_index = None
    return _SegmentPlan([tuple(seg) for seg in segments], output_index)


def _segment_sums(windows, plan):
    """Concatenated per-segment sums of shifted, sliced product windows."""
    if all(not entries for entries, _ in plan.segments):
        return None
    parts = []
    for entries, width in plan.segments:
        total = None
        for (u, _), start in entries.items():
            term = windows[u][..., start : start + width]
            total = term if total is None else total + term
        if total is None:
            total = ops.zeros(ops.shape(windows[0])[:-1] + (width,), windows[0].dtype)
        parts.append(total)
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def _gathered_sums(windows, index):
    """Sum over taps and groups of `window[..., index[u, k]]` (-1 reads zero)."""
    total = None
    for u, window in enumerate(windows):
        for k in range(index.shape[1]):
            idx = index[u, k]
            if (idx < 0).all():
                continue
            term = ops.take(window, np.maximum(idx, 0), axis=-1)
            if (idx < 0).any():
                term = term * ops.cast((idx >= 0).astype("float32"), term.dtype)
            total = term if total is None else total + term
    return total
