"""How pruned filters are rebuilt: the `Reconstruction` settings, and which layers can take them.

`Reconstruction` is one value object for the settings that travel together
from a user's call to every layer it touches: the transforms a replaced
filter may take, the learned family refining them, the criterion choosing
the bases, how each replaced filter picks its base, depth groups, scale, and
how bases are allocated between layers. It is validated once, where it is
made; `transform_model`, `prune_model`, `TransformPruning` and `plan_budget`
take it whole, and `TransformPruning.get_config` saves it.

`skip_reason(layer, transforms)` says why a layer cannot become a
`TransformConv2D` (the same rule for conversion, pruning and the model
builders' conv factory); `CONVOLUTIONS` are the layers a conversion report
lists, converted or not.
"""

import dataclasses
import warnings

import keras

from tf_transform_conv._checks import check_bool
from tf_transform_conv._checks import check_choice
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.ops import families as families_lib
from tf_transform_conv.ops import transforms as transforms_lib
from tf_transform_conv.ops.assignment import ASSIGNMENTS
from tf_transform_conv.ops.assignment import CRITERIA
from tf_transform_conv.ops.assignment import fit_assignment

__all__ = [
    "ALLOCATIONS",
    "CONVOLUTIONS",
    "Reconstruction",
    "check_transforms",
    "shape_skip_reason",
    "skip_reason",
]

#: How the kept filters are split between layers: each its own rate, or one ranking.
ALLOCATIONS = ("per_layer", "global")


def check_transforms(transforms, kernel_size=None):
    """The names of `transforms`; they must include `"identity"` (a kept filter is its own base).

    Args:
        transforms: a preset, a transform name or a list of names
            (`tf_transform_conv.ops.transforms.resolve_transforms`).
        kernel_size: optional `(kh, kw)`: rotations and transpositions are
            then rejected for a non-square kernel.

    Returns:
        A tuple of transform names.

    Raises:
        ValueError: for an unknown name, or a set without `"identity"`.
    """
    names = transforms_lib.resolve_transforms(transforms, kernel_size)
    if "identity" not in names:
        raise ValueError(
            "`transforms` must include 'identity' (a kept filter is its own "
            f"base). Received transforms={list(names)}."
        )
    return names


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """How a pruned filter is rebuilt from a kept one: the settings of conversion and pruning.

    Each filter that a layer stops learning is rebuilt as
    `scale * L(phi) @ T(base)`: a kept filter (a *base*) under a discrete
    transform `T` (rotation, mirror or one-tap shift), refined by a learned
    operator `L` when `transform_family` is not `"discrete"`, times a scale.
    These settings say which transforms and family, which filters stay
    bases, and how many each layer keeps. Every field is checked here, once;
    the verbs that take a `Reconstruction` (`transform_model`,
    `prune_model`, `TransformPruning`, `plan_budget`) use it as it is.

    Args:
        transforms: a preset (`"d4"`, `"rotations"`, `"flips"`, `"shifts"`,
            `"all"`), a transform name or a list of names; it must contain
            `"identity"` (a kept filter is its own base). Stored as a tuple
            of names. Defaults to `"d4"`.
        transform_family: `"discrete"` (default) or a learned family,
            `"scalar"` (a multiplier per tap: the paper's), `"rotation"`,
            `"affine"` or `"general"` (`tf_transform_conv.ops.families`). A
            learned operator starts at its least-squares fit to the filter
            it replaces.
        criterion: which filters stay bases: `"reconstruction"` (default:
            the set that rebuilds the others best), `"l1"` or `"magnitude"`
            (largest L1 or L2 norm; the paper's saliency is the L2 norm), or
            `"taylor"` (the first-order saliency `|sum(w * dL/dw)|`, which
            needs gradients on data: pruning only).
        assign: `"fit"` (default: each replaced filter takes the kept filter
            that rebuilds it best) or `"modulo"` (filter `o` takes kept
            filter `o mod n`, the paper's rule, with its best transform and
            scale).
        scale: bool, whether rebuilt filters carry a trainable scale.
            Defaults to True.
        depth_groups: int >= 1, contiguous groups of input channels with
            their own assignment (the paper's `G`). A layer whose input
            channels it does not divide (an RGB stem) gets 1 (`for_layer`).
            Defaults to 1.
        allocation: `"per_layer"` (default: every layer reaches the sparsity
            itself) or `"global"` (one ranking of the criterion's saliency
            over all layers reaches it overall; the L2 norm for
            `"reconstruction"`).
        min_bases: int >= 1, the fewest bases a layer keeps (the paper: 8 on
            CIFAR, 32 on ImageNet). Defaults to 1.
        subtract_mean: bool, for a global allocation: rank each filter's
            saliency minus its layer's mean (the paper's v1, which keeps
            layers' rates alike). Defaults to False.

    Raises:
        ValueError: naming the first invalid field, what is allowed and what
            was received.

    Example:

    >>> rec = Reconstruction(transforms="rotations", transform_family="scalar")
    >>> rec.transforms, rec.criterion
    (('identity', 'rot90', 'rot180', 'rot270'), 'reconstruction')
    >>> Reconstruction.from_config(rec.get_config()) == rec
    True
    """

    transforms: tuple = "d4"
    transform_family: str = "discrete"
    criterion: str = "reconstruction"
    assign: str = "fit"
    scale: bool = True
    depth_groups: int = 1
    allocation: str = "per_layer"
    min_bases: int = 1
    subtract_mean: bool = False

    def __post_init__(self):
        def set_field(name, value):  # a frozen dataclass normalises its fields this way
            object.__setattr__(self, name, value)

        set_field("transforms", check_transforms(self.transforms))
        set_field("transform_family", families_lib.check_family(self.transform_family))
        set_field("criterion", check_choice(self.criterion, "criterion", CRITERIA))
        set_field("assign", check_choice(self.assign, "assign", ASSIGNMENTS))
        set_field("scale", check_bool(self.scale, "scale"))
        set_field("depth_groups", check_positive_int(self.depth_groups, "depth_groups"))
        set_field("allocation", check_choice(self.allocation, "allocation", ALLOCATIONS))
        set_field("min_bases", check_positive_int(self.min_bases, "min_bases",
                                                  expected="an int >= 1"))
        set_field("subtract_mean", check_bool(self.subtract_mean, "subtract_mean"))
        if self.subtract_mean and self.allocation != "global":
            raise ValueError(
                "Invalid value for argument `subtract_mean`: it ranks each filter "
                "against its layer's mean in one ranking over all layers, so it needs "
                "allocation='global' (per layer, a shift changes no ranking). Received "
                f"subtract_mean=True with allocation={self.allocation!r}."
            )

    @classmethod
    def recommended(cls):
        """The settings measured most accurate against a thin network of the same size.

        The affine family (a learned affine map of each rebuilt filter's
        base, sampled bilinearly, and a scale) on the identity, with the
        defaults' selection: the filters that rebuild the others best stay
        bases, each rebuilt filter takes the base that fits it best, every
        layer pruned to the schedule's rate. Pruned while the network trains
        from scratch, linearly over the first 40% of the steps, it beat a
        dense network thinned to the same convolution parameters and
        trained as long on both tasks measured, at a quarter and a tenth of
        the parameters (`benchmarks/ablation.py`, 3 epochs, 3 seeds: +2.6
        to +6.2 points). Trained 12 epochs the margin shrinks (+1.0 at a
        quarter, +2.6 at a tenth); distilled from the dense model, it is
        +1.5 points above the thin network distilled from the same teacher
        at a quarter, 0.8 below dense (the "Ablation" benchmark page). The
        defaults (`Reconstruction()`: d4 transforms, no learned operator)
        rebuild worse at high rates.

        Example:

        >>> rec = Reconstruction.recommended()
        >>> rec.transforms, rec.transform_family, rec.criterion, rec.assign
        (('identity',), 'affine', 'reconstruction', 'fit')
        """
        return cls(transforms="identity", transform_family="affine")

    @classmethod
    def get(cls, value):
        """`value` as a `Reconstruction`: None gives the defaults, a dict its config.

        Raises:
            ValueError: for anything else.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_config(value)
        raise ValueError(
            "Invalid value for argument `reconstruction`. Expected a "
            "tf_transform_conv.Reconstruction (or None for the defaults). "
            f"Received reconstruction={value!r}."
        )

    def replace(self, **changes):
        """A copy with `changes` (checked like the constructor's arguments)."""
        return dataclasses.replace(self, **changes)

    def for_layer(self, layer):
        """These settings for one convolution: `depth_groups` 1 where it does not divide its input channels."""
        channels = layer.kernel.shape[2]
        if channels % self.depth_groups == 0:
            return self
        return self.replace(depth_groups=1)

    def warn_if_min_bases_keep_all(self, layers, verb):
        """Warns when `min_bases` is at least the filters of some of `layers`: they are never pruned."""
        whole = [f"'{layer.name}' ({layer.filters})" for layer in layers
                 if self.min_bases >= layer.filters]
        if whole:
            warnings.warn(
                f"{verb}: min_bases={self.min_bases} is at least the filters of "
                f"{', '.join(whole)}, so {'it keeps' if len(whole) == 1 else 'they keep'} "
                "every filter whatever the sparsity. Lower `min_bases` below the "
                "filters of the layers to prune.",
                stacklevel=3,
            )

    def skip_reason(self, layer):
        """Why `layer` cannot be rebuilt with these transforms ("" when it can); see `skip_reason`."""
        return skip_reason(layer, self.transforms)

    def fit(self, kernel, base_filters, candidates=None, scores=None):
        """`ops.assignment.fit_assignment` of `kernel` with these settings.

        Args:
            kernel: `(kh, kw, c_in, F)` array.
            base_filters: int, the bases to keep.
            candidates: optional indices of the filters that may stay bases.
            scores: per-filter saliencies, for `criterion="taylor"`.

        Returns:
            An `ops.assignment.AssignmentFit`.
        """
        kernel_size = tuple(kernel.shape[:2])
        return fit_assignment(
            kernel, base_filters,
            transforms=check_transforms(self.transforms, kernel_size),
            depth_groups=self.depth_groups,
            scale=self.scale,
            criterion=self.criterion,
            candidates=candidates,
            transform_family=self.transform_family,
            scores=scores if self.criterion == "taylor" else None,
            assign=self.assign,
        )

    def get_config(self):
        """A JSON-able dict of the fields (`from_config` rebuilds it)."""
        config = dataclasses.asdict(self)
        config["transforms"] = list(self.transforms)
        return config

    @classmethod
    def from_config(cls, config):
        """The `Reconstruction` of a `get_config` dict."""
        return cls(**config)


# The convolutions a report lists, converted or not.
CONVOLUTIONS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv2DTranspose,
)


def skip_reason(layer, transforms):
    """Why `layer` cannot become a `TransformConv2D` under `transforms` ("" when it can).

    Only `keras.layers.Conv2D` layers with `groups=1`, a kernel larger than
    1x1 and a shape the transforms apply to (rotations need a square kernel)
    can.
    """
    if isinstance(layer, keras.layers.SeparableConv2D):
        return "separable convolution: not supported"
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise convolution: each filter sees its own channel, no filters to share"
    if isinstance(layer, keras.layers.Conv2DTranspose):
        return "transposed convolution: not supported"
    if not isinstance(layer, keras.layers.Conv2D):
        return "not a Conv2D"
    return shape_skip_reason(layer.kernel_size, layer.groups, transforms)


def shape_skip_reason(kernel_size, groups, transforms):
    """Why a `Conv2D` of this shape cannot be a `TransformConv2D` ("" when it can)."""
    kernel_size = tuple(kernel_size)
    if groups != 1:
        return f"grouped convolution (groups={groups}): not supported"
    if kernel_size == (1, 1):
        return "1x1 kernel: spatial transforms are meaningless"
    try:
        transforms_lib.resolve_transforms(transforms, kernel_size)
    except ValueError as e:
        return f"kernel {kernel_size}: {e}"
    degenerate = transforms_lib.degenerate_reason(transforms, kernel_size)
    return f"kernel {kernel_size}: {degenerate}" if degenerate else ""
