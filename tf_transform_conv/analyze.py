"""Seeing the redundancy: how well each layer's filters are rebuilt from spatial transforms.

For every eligible `Conv2D` of a model, and for each transform (paired with
`identity`, so a kept filter is its own base) and each sparsity, fit an
assignment (`fit_assignment`) and report the layer's relative reconstruction
error `||W - W_rec||_F / ||W||_F`. The learned families
(`tf_transform_conv.ops.families`) are fitted by least squares on top of
`identity` alone (the paper's setting: each reconstructed filter a learned
operator of a kept one) and on top of the d4 symmetries. The same fits on
random Gaussian filters of the same shape (each scaled to its trained
counterpart's norm) give the baseline: trained filters reconstructed better
than random ones is the premise of the method, measured.
"""

import dataclasses

import keras
import numpy as np

from tf_transform_conv import _compat
from tf_transform_conv.ops import transforms as transforms_lib
from tf_transform_conv.ops.assignment import fit_assignment
from tf_transform_conv.ops.assignment import kept_filters

DEFAULT_SPARSITIES = (0.25, 0.5, 0.75)
#: The learned families `analyze_kernel` fits besides the discrete transforms.
LEARNED_FAMILIES = ("scalar", "rotation", "affine", "general")


@dataclasses.dataclass(frozen=True)
class RedundancyRow:
    """One fit: a layer, a transform set (and family), a sparsity; trained and random errors."""

    layer: str
    transforms: str
    sparsity: float
    bases: int
    error: float
    random_error: float
    family: str = "discrete"

    def to_dict(self):
        return dataclasses.asdict(self)


def transform_sets(kernel_size, names=None, families=LEARNED_FAMILIES):
    """`{label: (transforms, family)}`: identity alone (shared, scaled copies: the
    reference that says what the spatial transforms add), each transform with
    identity, the presets that apply, then each learned family on identity
    alone (`"scalar"`, ...) and on the d4 symmetries (`"d4+scalar"`, ...)."""
    sets = {"identity": (("identity",), "discrete")}
    for name in names or transforms_lib.TRANSFORM_NAMES:
        if name == "identity":
            continue
        if transforms_lib.needs_square(name) and kernel_size[0] != kernel_size[1]:
            continue
        sets[name] = (("identity", name), "discrete")
    for preset in ("flips", "rotations", "d4", "shifts"):
        try:
            sets[preset] = (transforms_lib.resolve_transforms(preset, kernel_size), "discrete")
        except ValueError:
            continue
    symmetries = "d4" if kernel_size[0] == kernel_size[1] else "flips"
    for family in families:
        sets[family] = (("identity",), family)
        sets[f"{symmetries}+{family}"] = (sets[symmetries][0], family)
    return sets


def analyze_kernel(kernel, name="kernel", sparsities=DEFAULT_SPARSITIES, seed=0, names=None,
                   families=LEARNED_FAMILIES):
    """Rows of `RedundancyRow` for one dense kernel `(kh, kw, c_in, filters)`."""
    kernel = np.asarray(kernel, np.float64)
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=kernel.shape)
    norms = np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0)
    noise *= norms / np.maximum(np.linalg.norm(noise.reshape(-1, kernel.shape[-1]), axis=0), 1e-30)
    rows = []
    for label, (names_, family) in transform_sets(kernel.shape[:2], names, families).items():
        for sparsity in sparsities:
            n = kept_filters(kernel.shape[-1], sparsity)
            trained = fit_assignment(kernel, n, transforms=names_, transform_family=family)
            random = fit_assignment(noise, n, transforms=names_, transform_family=family)
            rows.append(
                RedundancyRow(name, label, float(sparsity), n,
                              float(trained.layer_error), float(random.layer_error), family)
            )
    return rows


def analyze_model(model, sparsities=DEFAULT_SPARSITIES, seed=0, names=None,
                  families=LEARNED_FAMILIES):
    """`RedundancyRow`s for every `Conv2D` of `model` that a transform can rebuild.

    Args:
        model: a Keras model (its `Conv2D` layers with `groups=1` and a
            kernel larger than 1x1 are analysed).
        sparsities: fractions of filters to reconstruct.
        seed: seed of the random baseline.
        names: transforms to try one by one (default: the whole catalogue).
        families: learned families to fit as well (default: all four).
    """
    rows = []
    for layer in _compat.layers_of(model):
        if (
            type(layer) is keras.layers.Conv2D
            and layer.groups == 1
            and tuple(layer.kernel_size) != (1, 1)
        ):
            rows += analyze_kernel(
                np.asarray(layer.kernel), layer.name, sparsities, seed, names, families
            )
    return rows


def format_rows(rows):
    """A table: one line per layer and transform set, trained/random error per sparsity."""
    sparsities = sorted({r.sparsity for r in rows})
    header = f"{'layer':<20} {'transforms':<14}" + "".join(
        f" {'s=' + format(s, 'g') + ' trained/random':>24}" for s in sparsities
    )
    lines = [header]
    table = {}
    for r in rows:
        table.setdefault((r.layer, r.transforms), {})[r.sparsity] = r
    for (layer, label), by_s in table.items():
        cells = "".join(
            f" {by_s[s].error:>11.3f} / {by_s[s].random_error:<10.3f}" if s in by_s else " " * 25
            for s in sparsities
        )
        lines.append(f"{layer:<20} {label:<14}{cells}")
    return "\n".join(lines)


def plot_rows(rows, path):
    """Error against sparsity per layer: one line per transform set, random dashed.

    Two rows of panels: the discrete presets (with `identity`, scaled copies,
    as the reference), and the learned families (with `identity` and `d4`).
    The single-transform sets are in the table and the JSON, not the plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r.layer for r in rows))
    labels = list(dict.fromkeys(r.transforms for r in rows))
    presets = [l for l in labels if l == "identity" or l in transforms_lib.PRESETS]
    learned = [l for l in labels if l not in presets and l not in transforms_lib.TRANSFORM_NAMES]
    panels = [("discrete presets", presets)]
    if learned:
        panels.append(("learned families", ["identity", "d4"] + learned))
    fig, axes = plt.subplots(len(panels), len(layers), figsize=(5 * len(layers), 4 * len(panels)),
                             squeeze=False)
    colors = dict(zip(dict.fromkeys(presets + learned), plt.cm.tab20.colors * 2))
    for row_index, (title, wanted) in enumerate(panels):
        for ax, layer in zip(axes[row_index], layers):
            mine = [r for r in rows if r.layer == layer]
            for label in wanted:
                line = sorted((r for r in mine if r.transforms == label), key=lambda r: r.sparsity)
                if not line:
                    continue
                xs = [r.sparsity for r in line]
                ax.plot(xs, [r.error for r in line], marker="o", label=label, color=colors[label])
                ax.plot(xs, [r.random_error for r in line], linestyle="--",
                        color=colors[label], alpha=0.5)
            ax.set_title(f"{layer}, {title} (dashed: random filters)", fontsize="medium")
            ax.set_xlabel("sparsity (fraction of filters reconstructed)")
            ax.set_ylabel("relative reconstruction error")
            ax.grid(alpha=0.3)
        axes[row_index][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
