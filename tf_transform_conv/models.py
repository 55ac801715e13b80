"""Reference CNNs whose convolutions come from one factory: dense and transformed twins.

Every builder takes `conv`, a *conv factory* (the habit of timm's
`create_conv2d`): model code asks the factory for each convolution and never
branches on its type, so a dense model and its `TransformConv2D` twin share one
definition and have the same layer names.

    dense = cifar_resnet(56)
    twin = cifar_resnet(56, conv=conv_factory(base_ratio=1 / 4))   # 3x3 convs: 1/4 of the bases

A factory is any callable

    factory(filters, kernel_size, strides=1, padding="same", use_bias=False,
            name=None, *, in_channels=None, **kwargs) -> layer

returning a layer that computes a 2D convolution (`kwargs` are `Conv2D`
arguments such as `kernel_initializer`; `in_channels`, the input channels the
builders always pass, is information for the factory and is not a `Conv2D`
argument). `conv_factory()` makes the standard one.

Which convolutions get transformed is the factory's decision, made from the
arguments alone (the same rule as conversion, `reconstruction.shape_skip_reason`):

- 1x1 kernels stay `Conv2D`: every spatial transform of a single tap is the
  identity (or a shift to zero), so there is nothing to share.
- Grouped convolutions stay `Conv2D` (`TransformConv2D` has no `groups`), and
  so do non-square kernels when a chosen transform needs a square one.
- Depthwise convolutions never go through the factory (each filter sees one
  channel: there are no filters to share); builders make `DepthwiseConv2D`.
- The stem (the first convolution, on the 3 image channels) is an ordinary
  3x3 or 7x7 convolution and is transformed like any other. It holds a small
  share of the parameters; to keep it dense, wrap the factory:
  `lambda *a, in_channels=None, **k: (keras.layers.Conv2D(*a, **k) if
  in_channels == 3 else factory(*a, in_channels=in_channels, **k))`.
  With `depth_groups > 1`, a convolution whose `in_channels` do not divide
  into the groups (the 3-channel stem) gets `depth_groups=1`.

Published figures these builders reproduce (`tests/test_models.py` checks
them within 2% with `cost.model_cost`, which counts the multiply-adds of
`Conv2D`, `DepthwiseConv2D` and `Dense` as published counts do; the
parameters include the BatchNorm moving statistics):

| model | published params | built params | published MACs | built MACs |
|---|---|---|---|---|
| `cifar_resnet(20)` | 0.27M | 271,098 | 41M | 40,551,040 |
| `cifar_resnet(32)` | 0.46M | 466,426 | 69M | 68,862,592 |
| `cifar_resnet(56)` | 0.85M | 857,082 | 125M | 125,485,696 |
| `cifar_resnet(110)` | 1.7M | 1,736,058 | 253M | 252,887,680 |
| `cifar_vgg16()` | 14.7M | 14,732,490 | 313M | 313,201,664 |
| `imagenet_resnet(18)` | 11.7M | 11,699,112 | 1.8G | 1,814,073,344 |
| `imagenet_resnet(34)` | 21.8M | 21,814,696 | 3.6G | 3,663,761,408 |
| `imagenet_resnet(50)` | 25.6M | 25,610,152 | 4.1G | 4,089,184,256 |
| `mobilenet_v2()` | 3.5M | 3,538,984 | 300M | 300,774,272 |

(The published figures are rounded: ResNet-56's 0.85M is 857,082 here.)
"""

import functools
import math

import keras
import numpy as np

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import is_int
from tf_transform_conv._checks import is_number
from tf_transform_conv.layers.channel_pad import ChannelPad
from tf_transform_conv.layers.transform_conv import IMPLEMENTATIONS
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops import families as families_lib
from tf_transform_conv.ops import transforms as transforms_lib
from tf_transform_conv.reconstruction import shape_skip_reason

__all__ = [
    "DEFAULT_TRANSFORMS",
    "MODELS",
    "WIDTH_MODELS",
    "ConvFactory",
    "build_model",
    "cifar_resnet",
    "cifar_vgg16",
    "conv_factory",
    "imagenet_resnet",
    "mobilenet_v2",
    "thin_width",
]

#: The transforms `conv_factory` uses for a base ratio when none are given:
#: `1 / len(transforms)` of the filters are bases under the default assignment.
DEFAULT_TRANSFORMS = {
    1: ("identity",),
    2: ("identity", "rot180"),
    4: "rotations",
    8: "d4",
}

# BatchNorm as in torchvision (PyTorch eps=1e-5, momentum=0.1).
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9
_KERNEL_INITIALIZER = "he_normal"


# ----------------------------------------------------------------------
# The conv factory


def _kernel_pair(kernel_size):
    if isinstance(kernel_size, (int, np.integer)):
        return int(kernel_size), int(kernel_size)
    kh, kw = (int(k) for k in kernel_size)
    return kh, kw


class ConvFactory:
    """Makes `Conv2D` or `TransformConv2D` layers; see `conv_factory`."""

    def __init__(
        self,
        base_ratio=None,
        transforms=None,
        depth_groups=1,
        scale=False,
        implementation="auto",
        transform_family="discrete",
    ):
        families_lib.check_family(transform_family)
        if transforms is not None:
            transforms = transforms_lib.resolve_transforms(transforms)
        if base_ratio is not None:
            if not is_number(base_ratio) or not 0 < base_ratio <= 1:
                raise ValueError(
                    "Invalid value for argument `base_ratio`. Expected a number "
                    f"in (0, 1] or None. Received base_ratio={base_ratio!r}."
                )
            base_ratio = float(base_ratio)
            if transforms is None:
                count = round(1 / base_ratio)
                if count not in DEFAULT_TRANSFORMS or not math.isclose(
                    base_ratio * count, 1.0, rel_tol=1e-6
                ):
                    raise ValueError(
                        "conv_factory() has default transforms only for "
                        f"base_ratio in {[f'1/{n}' for n in DEFAULT_TRANSFORMS]}. "
                        f"Received base_ratio={base_ratio:g}; pass `transforms` "
                        "(a preset or a list of names) with "
                        "base_ratio=1/len(transforms)."
                    )
                transforms = transforms_lib.resolve_transforms(DEFAULT_TRANSFORMS[count])
            elif not math.isclose(base_ratio * len(transforms), 1.0, rel_tol=1e-6):
                raise ValueError(
                    "With the default assignment `base_ratio` must be "
                    f"1/len(transforms). Received base_ratio={base_ratio:g} and "
                    f"{len(transforms)} transforms {list(transforms)} "
                    f"(base_ratio=1/{len(transforms)}); pass base_ratio="
                    f"1/{len(transforms)} or other transforms."
                )
        elif transforms is not None:
            base_ratio = 1.0 / len(transforms)
        else:
            extras = {
                "depth_groups": (depth_groups, 1),
                "scale": (scale, False),
                "implementation": (implementation, "auto"),
                "transform_family": (transform_family, "discrete"),
            }
            given = [f"{k}={v!r}" for k, (v, default) in extras.items() if v != default]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to TransformConv2D layers, "
                    "but base_ratio=None and transforms=None make a dense "
                    "(Conv2D) factory. Pass base_ratio (e.g. 1/4) or transforms."
                )
        check_positive_int(depth_groups, "depth_groups")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                "Invalid value for argument `implementation`. Expected one of "
                f"{list(IMPLEMENTATIONS)}. Received implementation={implementation!r}."
            )
        self.base_ratio = base_ratio
        self.transforms = transforms
        self.depth_groups = int(depth_groups)
        self.scale = bool(scale)
        self.implementation = implementation
        self.transform_family = transform_family

    @property
    def transformed(self):
        """Whether this factory makes `TransformConv2D` layers (where it can)."""
        return self.base_ratio is not None

    def choose(self, kernel_size, groups=1):
        """`("Conv2D" | "TransformConv2D", reason)` for a convolution of this shape."""
        kh, kw = _kernel_pair(kernel_size)
        if not self.transformed:
            return "Conv2D", "dense factory (base_ratio=None)"
        reason = shape_skip_reason((kh, kw), groups, self.transforms)
        if reason:
            return "Conv2D", reason
        return "TransformConv2D", f"{len(self.transforms)} transforms {list(self.transforms)}"

    def __call__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        use_bias=False,
        name=None,
        *,
        in_channels=None,
        **kwargs,
    ):
        common = {"strides": strides, "padding": padding, "use_bias": use_bias, "name": name}
        kind, _ = self.choose(kernel_size, kwargs.get("groups", 1))
        if kind == "Conv2D":
            return keras.layers.Conv2D(filters, kernel_size, **common, **kwargs)
        count = len(self.transforms)
        if filters % count:
            raise ValueError(
                f"conv_factory(base_ratio=1/{count}) cannot make layer "
                f"{name or '(unnamed)'}: the default assignment needs `filters` "
                f"divisible by len(transforms), so base_filters = filters / "
                f"{count}. Received filters={filters} and {count} transforms "
                f"{list(self.transforms)}."
            )
        depth_groups = self.depth_groups
        if in_channels is not None and in_channels % depth_groups:
            depth_groups = 1
        return TransformConv2D(
            filters,
            kernel_size,
            base_filters=filters // count,
            transforms=self.transforms,
            depth_groups=depth_groups,
            scale=self.scale,
            implementation=self.implementation,
            transform_family=self.transform_family,
            **common,
            **kwargs,
        )

    def __repr__(self):
        if not self.transformed:
            return "conv_factory()"
        return (
            f"conv_factory(base_ratio={self.base_ratio:g}, "
            f"transforms={list(self.transforms)}, depth_groups={self.depth_groups}, "
            f"scale={self.scale}, implementation={self.implementation!r}, "
            f"transform_family={self.transform_family!r})"
        )


def conv_factory(
    base_ratio=None, transforms=None, depth_groups=1, scale=False, implementation="auto",
    transform_family="discrete",
):
    """A conv factory: plain `Conv2D`, or `TransformConv2D` at a base ratio.

    The model builders of this module take the result as `conv=`: they ask it
    for every convolution, so the same definition builds the dense model and
    its transformed twin. The factory makes `keras.layers.Conv2D` when
    `base_ratio` and `transforms` are both None, and otherwise
    `TransformConv2D` with the default assignment: `base_filters =
    filters / len(transforms)`, output block `j` holding every base under
    transform `j`. Convolutions where spatial transforms make no sense (1x1
    kernels, grouped convolutions, non-square kernels under rotations) stay
    `Conv2D`; `factory.choose(kernel_size)` says which and why.

    Args:
        base_ratio: float in `(0, 1]` or None, the fraction of each
            transformed layer's filters that are learned bases. Without
            `transforms` it picks them: `1/2` -> `["identity", "rot180"]`,
            `1/4` -> `"rotations"`, `1/8` -> `"d4"` (and `1` -> identity only);
            other ratios need `transforms`. With `transforms` it must equal
            `1 / len(transforms)`. None (default) with `transforms` given
            means `1 / len(transforms)`; None without them is the dense
            factory.
        transforms: a preset (`"rotations"`, `"d4"`, `"flips"`, `"shifts"`,
            `"all"`) or a list of transform names, or None (default).
        depth_groups: int, passed to `TransformConv2D` (a convolution whose
            `in_channels` it does not divide gets 1). Defaults to `1`.
        scale: bool, a trainable scale per output filter. Defaults to `False`.
        implementation: `"auto"` (default), `"materialized"` or `"factored"`.
        transform_family: `"discrete"` (default), `"scalar"`, `"rotation"`,
            `"affine"` or `"general"` (`tf_transform_conv.ops.families`).

    Returns:
        A `ConvFactory`, called as `factory(filters, kernel_size, strides=1,
        padding="same", use_bias=False, name=None, *, in_channels=None,
        **kwargs)` with `Conv2D` keyword arguments in `kwargs`.

    Raises:
        ValueError: for a base ratio without default transforms, a base
            ratio inconsistent with `transforms`, unknown transform names,
            TransformConv2D options given to a dense factory, or bad
            `depth_groups` / `implementation`; when called, for `filters` not
            divisible by `len(transforms)`.

    Example:

    >>> factory = conv_factory(base_ratio=1 / 4)
    >>> layer = factory(64, 3, name="conv")
    >>> type(layer).__name__, layer.base_filters, layer.transforms
    ('TransformConv2D', 16, ('identity', 'rot90', 'rot180', 'rot270'))
    >>> type(factory(64, 1)).__name__
    'Conv2D'
    >>> type(conv_factory()(64, 3)).__name__
    'Conv2D'
    """
    return ConvFactory(
        base_ratio=base_ratio,
        transforms=transforms,
        depth_groups=depth_groups,
        scale=scale,
        implementation=implementation,
        transform_family=transform_family,
    )


def _resolve_factory(conv):
    if conv is None:
        return ConvFactory()
    if not callable(conv):
        raise ValueError(
            "Expected `conv` to be a conv factory (e.g. conv_factory(base_ratio=1/4)) "
            f"or None for plain Conv2D. Received conv={conv!r}."
        )
    return conv


# ----------------------------------------------------------------------
# Shared pieces


def _conv(x, conv, filters, kernel_size, strides=1, name=None):
    """A convolution from the factory, padded as PyTorch pads (symmetric, k // 2).

    Stride-1 convolutions use `"same"`; strided ones with a kernel larger than
    1 pad `k // 2` on each side explicitly (TensorFlow's `"same"` would pad
    the bottom/right only), so the models compute what their torchvision
    counterparts compute.
    """
    padding = "same"
    if strides != 1:
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        if k // 2:
            x = keras.layers.ZeroPadding2D(k // 2, name=f"{name}_pad")(x)
        padding = "valid"
    layer = conv(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        name=name,
        in_channels=x.shape[-1],
        kernel_initializer=_KERNEL_INITIALIZER,
    )
    return layer(x)


def _bn(x, name):
    return keras.layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name
    )(x)


def _check_input_shape(input_shape):
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            "Expected `input_shape` to be (rows, cols, channels) with known "
            f"channels (channels_last). Received input_shape={input_shape!r}."
        )
    return shape


def _check_width(width):
    if not is_number(width) or not 0 < width <= 4:
        raise ValueError(
            "Invalid value for argument `width`. Expected a number in (0, 4], the "
            f"factor on every layer's filters. Received width={width!r}."
        )
    return float(width)


def _scaled(filters, width):
    """`filters` times `width`, rounded, at least 1."""
    return max(1, round(filters * width))


def _widened(name, width):
    return name if width == 1 else f"{name}_w{width:g}"


def _head(x, num_classes):
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.layers.Dense(num_classes, name="logits")(x)


def _model_name(base, conv):
    return base if not getattr(conv, "transformed", False) else base + "_transformed"


# ----------------------------------------------------------------------
# CIFAR


def _cifar_basic_block(x, conv, filters, strides, name):
    in_channels = x.shape[-1]
    y = _conv(x, conv, filters, 3, strides, name=f"{name}_conv1")
    y = _bn(y, f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, conv, filters, 3, name=f"{name}_conv2")
    y = _bn(y, f"{name}_bn2")
    shortcut = x
    if strides != 1:  # option A: subsample by taking every other pixel
        shortcut = keras.layers.MaxPooling2D(1, strides, name=f"{name}_subsample")(x)
    if filters != in_channels:  # ... and pad the new channels with zeros
        extra = filters - in_channels
        shortcut = ChannelPad((extra // 2, extra - extra // 2), name=f"{name}_pad")(
            shortcut
        )
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def cifar_resnet(depth, num_classes=10, conv=None, input_shape=(32, 32, 3), width=1.0):
    """The CIFAR ResNet of He et al. (2016), section 4.2.

    A 3x3 stem convolution with 16 filters, three stages of `(depth - 2) / 6`
    basic blocks with 16, 32 and 64 filters (the first block of stages 2 and
    3 halving the resolution with a stride-2 convolution), global average
    pooling and a dense classifier. Shortcuts are "option A": identity, with
    stride-2 subsampling (`MaxPooling2D(1, strides=2)`, which takes every
    other pixel) and zero-padded channels (`ChannelPad`, half on each side)
    where a stage widens, so shortcuts have no parameters. Every convolution
    is followed by BatchNorm; convolutions have no bias.

    Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for
    Image Recognition", CVPR 2016 (Table 6: ResNet-20/32/56/110 have
    0.27M/0.46M/0.85M/1.7M parameters, rounded; built here: 271,098 /
    466,426 / 857,082 / 1,736,058, with 40.6M / 68.9M / 125.5M / 252.9M
    multiply-adds).

    Args:
        depth: int, `6 n + 2` for `n >= 1` basic blocks per stage
            (20, 32, 44, 56, 110, 1202 in the paper).
        num_classes: int, the classifier's outputs (logits). Defaults to 10.
        conv: a conv factory (see `conv_factory`), or None for `Conv2D`.
        input_shape: `(rows, cols, channels)`. Defaults to `(32, 32, 3)`.
        width: float in (0, 4], the factor on every layer's filters
            (rounded, at least 1): the thin network of a given size.
            Defaults to 1.

    Returns:
        A Functional `keras.Model` named `cifar_resnet{depth}` (with
        `_w{width}` appended for a width other than 1, and `_transformed`
        when `conv` makes `TransformConv2D`).

    Raises:
        ValueError: for a depth that is not `6 n + 2`, or bad `num_classes`,
            `conv`, `input_shape` or `width`.

    Example:

    >>> model = cifar_resnet(20)
    >>> model.count_params()
    271098
    """
    if not is_int(depth) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "Invalid value for argument `depth`. Expected 6 n + 2 for n >= 1 "
            f"(e.g. 20, 32, 56, 110). Received depth={depth!r}."
        )
    check_positive_int(num_classes, "num_classes")
    width = _check_width(width)
    conv = _resolve_factory(conv)
    blocks = (depth - 2) // 6
    inputs = keras.Input(_check_input_shape(input_shape), name="image")
    x = _conv(inputs, conv, _scaled(16, width), 3, name="stem_conv")
    x = _bn(x, "stem_bn")
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(blocks):
            strides = 2 if stage > 1 and block == 0 else 1
            x = _cifar_basic_block(
                x, conv, _scaled(filters, width), strides,
                name=f"stage{stage}_block{block + 1}",
            )
    outputs = _head(x, num_classes)
    return keras.Model(
        inputs, outputs, name=_model_name(_widened(f"cifar_resnet{depth}", width), conv))


#: VGG-16 on CIFAR: numbers are 3x3 convolutions (+BN+ReLU), "M" 2x2 max pools.
VGG16_CIFAR_LAYERS = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
    512, 512, 512, "M", 512, 512, 512, "M",
)


def cifar_vgg16(num_classes=10, conv=None, input_shape=(32, 32, 3), width=1.0):
    """VGG-16 for CIFAR, with BatchNorm and a single dense classifier.

    Thirteen 3x3 convolutions (64, 64, pool, 128, 128, pool, 256 x3, pool,
    512 x3, pool, 512 x3, pool), each followed by BatchNorm and ReLU, then
    global average pooling (the map is 1x1 at 32x32 input) and one
    `Dense(num_classes)`: the variant common in CIFAR pruning work (e.g. the
    "VGG16" of kuangliu/pytorch-cifar), not the three-layer ImageNet
    classifier. The convolutions have 14.7M weights (no bias: BatchNorm
    follows), 313M multiply-adds at 32x32.

    Reference: K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks
    for Large-Scale Image Recognition", ICLR 2015.

    Args:
        num_classes: int, the classifier's outputs (logits). Defaults to 10.
        conv: a conv factory (see `conv_factory`), or None for `Conv2D`.
        input_shape: `(rows, cols, channels)`. Defaults to `(32, 32, 3)`.
        width: float in (0, 4], the factor on every layer's filters
            (rounded, at least 1). Defaults to 1.

    Returns:
        A Functional `keras.Model` named `cifar_vgg16` (`cifar_vgg16_w{width}`
        for a width other than 1).

    Raises:
        ValueError: for bad `num_classes`, `conv`, `input_shape` or `width`.
    """
    check_positive_int(num_classes, "num_classes")
    width = _check_width(width)
    conv = _resolve_factory(conv)
    inputs = keras.Input(_check_input_shape(input_shape), name="image")
    x = inputs
    index = pool = 0
    for item in VGG16_CIFAR_LAYERS:
        if item == "M":
            pool += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool{pool}")(x)
            continue
        index += 1
        x = _conv(x, conv, _scaled(item, width), 3, name=f"conv{index}")
        x = _bn(x, f"bn{index}")
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    outputs = _head(x, num_classes)
    return keras.Model(inputs, outputs, name=_model_name(_widened("cifar_vgg16", width), conv))


# ----------------------------------------------------------------------
# ImageNet


#: Blocks per stage and block type of the ImageNet ResNets (torchvision).
IMAGENET_RESNETS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _projection(x, conv, filters, strides, name):
    """Option B shortcut: 1x1 convolution (from the factory: it stays Conv2D) + BN."""
    x = _conv(x, conv, filters, 1, strides, name=f"{name}_downsample_conv")
    return _bn(x, f"{name}_downsample_bn")


def _imagenet_basic_block(x, conv, filters, strides, name):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _projection(x, conv, filters, strides, name)
    y = _conv(x, conv, filters, 3, strides, name=f"{name}_conv1")
    y = _bn(y, f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, conv, filters, 3, name=f"{name}_conv2")
    y = _bn(y, f"{name}_bn2")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, conv, filters, strides, name):
    out = filters * 4
    shortcut = x
    if strides != 1 or x.shape[-1] != out:
        shortcut = _projection(x, conv, out, strides, name)
    y = _conv(x, conv, filters, 1, name=f"{name}_conv1")
    y = _bn(y, f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, conv, filters, 3, strides, name=f"{name}_conv2")  # v1.5: stride here
    y = _bn(y, f"{name}_bn2")
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = _conv(y, conv, out, 1, name=f"{name}_conv3")
    y = _bn(y, f"{name}_bn3")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def imagenet_resnet(depth, num_classes=1000, conv=None, input_shape=(224, 224, 3), width=1.0):
    """The ImageNet ResNet of He et al. (2016), as in torchvision (v1.5).

    A 7x7 stride-2 stem convolution with 64 filters, BatchNorm, ReLU and a
    3x3 stride-2 max pool; four stages of 64, 128, 256 and 512 filters made
    of basic blocks (two 3x3 convolutions; depths 18, 34) or bottleneck
    blocks (1x1, 3x3, 1x1 with 4x expansion; depths 50, 101, 152), the first
    block of stages 2-4 halving the resolution; global average pooling and a
    dense classifier. Bottlenecks stride on the 3x3 convolution (torchvision's
    "v1.5"); shortcuts that change shape are 1x1 convolutions with BatchNorm
    (option B). Strided convolutions pad symmetrically as PyTorch does.
    ResNet-18/34/50 have 11.7M/21.8M/25.6M parameters and 1.8G/3.6G/4.1G
    multiply-adds at 224x224.

    Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for
    Image Recognition", CVPR 2016; torchvision `resnet.py`.

    Args:
        depth: int, one of 18, 34, 50, 101, 152.
        num_classes: int, the classifier's outputs (logits). Defaults to 1000.
        conv: a conv factory (see `conv_factory`), or None for `Conv2D`.
            The 1x1 convolutions ask it too (it keeps them `Conv2D`).
        input_shape: `(rows, cols, channels)`. Defaults to `(224, 224, 3)`;
            any size of at least 32 works (the network downsamples by 32).
        width: float in (0, 4], the factor on every layer's filters
            (rounded, at least 1). Defaults to 1.

    Returns:
        A Functional `keras.Model` named `resnet{depth}` (`resnet{depth}_w{width}`
        for a width other than 1).

    Raises:
        ValueError: for an unsupported depth, or bad `num_classes`, `conv`,
            `input_shape` or `width`.
    """
    if depth not in IMAGENET_RESNETS:
        raise ValueError(
            "Invalid value for argument `depth`. Expected one of "
            f"{sorted(IMAGENET_RESNETS)}. Received depth={depth!r}."
        )
    check_positive_int(num_classes, "num_classes")
    width = _check_width(width)
    conv = _resolve_factory(conv)
    kind, blocks = IMAGENET_RESNETS[depth]
    make_block = _imagenet_basic_block if kind == "basic" else _bottleneck_block
    inputs = keras.Input(_check_input_shape(input_shape), name="image")
    x = _conv(inputs, conv, _scaled(64, width), 7, 2, name="stem_conv")
    x = _bn(x, "stem_bn")
    x = keras.layers.ReLU(name="stem_relu")(x)
    # Zero padding before the max pool is exact: the inputs are >= 0 after ReLU.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, 2, name="stem_pool")(x)
    for stage, (count, filters) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for block in range(count):
            strides = 2 if stage > 1 and block == 0 else 1
            x = make_block(x, conv, _scaled(filters, width), strides,
                           name=f"stage{stage}_block{block + 1}")
    outputs = _head(x, num_classes)
    return keras.Model(inputs, outputs, name=_model_name(_widened(f"resnet{depth}", width), conv))


def _make_divisible(value, divisor=8):
    """Rounds channels to a multiple of `divisor`, never below 90% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


#: MobileNetV2 inverted residual stages: (expansion t, channels c, blocks n, stride s).
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _inverted_residual(x, conv, expansion, out, strides, name):
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = _conv(y, conv, in_channels * expansion, 1, name=f"{name}_expand")
        y = _bn(y, f"{name}_expand_bn")
        y = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    if strides != 1:
        y = keras.layers.ZeroPadding2D(1, name=f"{name}_depthwise_pad")(y)
    y = keras.layers.DepthwiseConv2D(
        3,
        strides=strides,
        padding="same" if strides == 1 else "valid",
        use_bias=False,
        depthwise_initializer=_KERNEL_INITIALIZER,
        name=f"{name}_depthwise",
    )(y)
    y = _bn(y, f"{name}_depthwise_bn")
    y = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(y)
    y = _conv(y, conv, out, 1, name=f"{name}_project")
    y = _bn(y, f"{name}_project_bn")
    if strides == 1 and in_channels == out:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_v2(num_classes=1000, conv=None, alpha=1.0, input_shape=(224, 224, 3)):
    """MobileNetV2 (Sandler et al., 2018), as in torchvision and Keras applications.

    A 3x3 stride-2 stem convolution (32 filters at `alpha=1`), seventeen
    inverted residual blocks (1x1 expansion, 3x3 depthwise, linear 1x1
    projection, each with BatchNorm; ReLU6), a 1x1 convolution to 1280
    channels, global average pooling and a dense classifier: 3.5M parameters,
    300M multiply-adds at 224x224 and `alpha=1`.

    Only the stem goes through the factory as a spatial convolution: the
    depthwise convolutions stay `DepthwiseConv2D` (each filter sees one
    channel, there are no filters to share) and the 1x1 convolutions ask the
    factory, which keeps them `Conv2D`. So a transformed twin differs from
    the dense model in the stem only: MobileNetV2 has almost no dense
    spatial convolution to compress.

    Reference: M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen,
    "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.

    Args:
        num_classes: int, the classifier's outputs (logits). Defaults to 1000.
        conv: a conv factory (see `conv_factory`), or None for `Conv2D`.
        alpha: float, the width multiplier (channels rounded to multiples
            of 8; the last convolution never narrower than 1280). Defaults
            to 1.0.
        input_shape: `(rows, cols, channels)`. Defaults to `(224, 224, 3)`.

    Returns:
        A Functional `keras.Model` named `mobilenet_v2` (`mobilenet_v2_{alpha}`
        when `alpha != 1`).

    Raises:
        ValueError: for a non-positive `alpha`, or bad `num_classes`, `conv`
            or `input_shape`.
    """
    if not is_number(alpha) or alpha <= 0:
        raise ValueError(
            "Invalid value for argument `alpha`. Expected a strictly positive "
            f"number. Received alpha={alpha!r}."
        )
    check_positive_int(num_classes, "num_classes")
    conv = _resolve_factory(conv)
    inputs = keras.Input(_check_input_shape(input_shape), name="image")
    x = _conv(inputs, conv, _make_divisible(32 * alpha), 3, 2, name="stem_conv")
    x = _bn(x, "stem_bn")
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    index = 0
    for expansion, channels, count, stride in MOBILENET_V2_STAGES:
        out = _make_divisible(channels * alpha)
        for block in range(count):
            index += 1
            x = _inverted_residual(
                x, conv, expansion, out, stride if block == 0 else 1, name=f"block{index}"
            )
    x = _conv(x, conv, _make_divisible(1280 * max(1.0, alpha)), 1, name="head_conv")
    x = _bn(x, "head_bn")
    x = keras.layers.ReLU(6.0, name="head_relu")(x)
    outputs = _head(x, num_classes)
    name = "mobilenet_v2" if alpha == 1 else f"mobilenet_v2_{alpha:g}"
    return keras.Model(inputs, outputs, name=_model_name(name, conv))


# ----------------------------------------------------------------------
# Registry


#: Model builders by name; each takes `num_classes=`, `conv=` and its own
#: keyword arguments (`input_shape`; `width` for the ResNets and VGG, `alpha`
#: for MobileNetV2).
MODELS = {
    "resnet20": functools.partial(cifar_resnet, 20),
    "resnet32": functools.partial(cifar_resnet, 32),
    "resnet56": functools.partial(cifar_resnet, 56),
    "resnet110": functools.partial(cifar_resnet, 110),
    "vgg16_cifar": cifar_vgg16,
    "resnet18": functools.partial(imagenet_resnet, 18),
    "resnet34": functools.partial(imagenet_resnet, 34),
    "resnet50": functools.partial(imagenet_resnet, 50),
    "mobilenet_v2": mobilenet_v2,
}


def build_model(name, num_classes=None, conv=None, **kwargs):
    """Builds the registered model `name` (see `MODELS`).

    Args:
        name: str, a key of `MODELS` (`"resnet20"`, `"resnet56"`,
            `"vgg16_cifar"`, `"resnet18"`, `"resnet50"`, `"mobilenet_v2"`, ...).
        num_classes: int, or None (default) for the model's own default
            (10 for the CIFAR models, 1000 for the ImageNet ones).
        conv: a conv factory (see `conv_factory`), or None for `Conv2D`.
        **kwargs: the builder's other arguments (`input_shape`; `width` for
            the ResNets and VGG, `alpha` for MobileNetV2).

    Returns:
        A Functional `keras.Model`.

    Raises:
        ValueError: for an unknown name, and as the builder raises.

    Example:

    >>> model = build_model("resnet20", conv=conv_factory(base_ratio=1 / 4))
    >>> model.name, model.output_shape
    ('cifar_resnet20_transformed', (None, 10))
    """
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}. Registered models are {sorted(MODELS)}."
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return MODELS[name](conv=conv, **kwargs)


#: The registered models whose builder takes `width` (MobileNetV2 has `alpha`).
WIDTH_MODELS = ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16_cifar", "resnet18",
                 "resnet34", "resnet50")


def thin_width(name, params, num_classes=None, **kwargs):
    """The width at which the registered model `name` has `params` parameters.

    The network a compressed model must beat is the same architecture made
    thin to the same size and trained as long: this finds its `width`
    (every layer's filters times it, see `cifar_resnet`) by bisection, to
    the width whose parameter count is nearest `params`.

    Args:
        name: a key of `MODELS` whose builder takes `width` (the ResNets and
            `"vgg16_cifar"`).
        params: int > 0, the parameters to match (e.g. a pruned, stripped
            model's `count_params()`), at most the model's at width 1.
        num_classes: as for `build_model`.
        **kwargs: the builder's other arguments (`input_shape`).

    Returns:
        `(width, params)`: the width (to 4 decimals where that builds the
        same model) and the parameters of the model it builds.

    Raises:
        ValueError: for a model without `width`, or `params` outside
            `(0, its parameters at width 1]`.

    Example:

    >>> width, count = thin_width("resnet20", 271098 // 4)
    >>> width, count
    (0.4922, 68738)
    >>> build_model("resnet20", width=width).count_params() == count
    True
    """
    if name not in WIDTH_MODELS:
        raise ValueError(
            f"thin_width needs a model whose builder takes `width`, one of "
            f"{list(WIDTH_MODELS)}. Received name={name!r}."
        )

    def count(width):
        model = build_model(name, num_classes, width=width, **kwargs)
        return int(model.count_params())

    full = count(1.0)
    if not is_number(params) or not 0 < params <= full:
        raise ValueError(
            f"Invalid value for argument `params`. Expected a number in (0, {full}], "
            f"the parameters of {name!r} at width 1. Received params={params!r}."
        )
    low, high = 1 / 1024, 1.0
    while high - low > 5e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if count(middle) < params else (low, middle)
    counts = {w: count(w) for w in (low, high)}
    width = min(counts, key=lambda w: (abs(counts[w] - params), w))
    nearest = counts[width]
    short = round(width, 4)  # a width a user can type, where it builds the same model
    return (short, nearest) if count(short) == nearest else (width, nearest)
