"""Trains a reference CNN on CIFAR-10, ImageNet, digits or synthetic data: dense, transformed, pruned or converted.

One recipe for every way of getting a compact `TransformConv2D` model:

- `--mode dense`: the plain model (`conv_factory()`), the baseline and the
  starting point of the other modes (`--init-from`, `--teacher`).
- `--mode transform`: the transformed twin trained from scratch
  (`conv_factory(base_ratio, transforms, depth_groups, scale)`).
- `--mode prune`: the dense model (from scratch or `--init-from`) wrapped with
  `prune_model` under a tfmot `PolynomialDecay`, trained with
  `UpdateTransformPruningStep`, then `strip_model`.
- `--mode convert`: `transform_model` applied to a trained dense checkpoint
  (`--init-from`), then fine-tuned.

Any mode can distil from a teacher (`--teacher PATH.keras`): the loss is
`(1 - w) * CE(y, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T))`, plus,
with `--inner-kd-weight gamma`, `gamma` times the mean squared error between
the student's and the teacher's features at `--inner-kd-layers` (inner
distillation, `tf_transform_conv.distill.InnerDistiller`).

Runs last: every epoch writes a backup (weights, optimizer state, pruning
step, epoch counter, training seconds so far; `AtomicBackupAndRestore`,
written so that a kill never leaves it half-written) and the model to
`<run-dir>/ckpt/last.keras`; restarting the same command (or `--resume`)
continues where it stopped, on the same data an uninterrupted run would see
(`training.data.training_stream`). Rerunning a finished run is refused, with
a pointer to `--fresh`, which deletes the run's outputs and starts over; a
start that fails before its first epoch is saved removes what it created. TensorBoard logs, a
CSV log and `results.json` (accuracy, parameters, multiply-adds, `.tflite`
size, and per `TransformConv2D` its bases, transforms, conversion error and
`.tflite` lowering) go to the run folder; `final.keras` loads with a plain
`keras.saving.load_model` once `tf_transform_conv` is imported.

This script is the recipe (arguments, data, model, training, results); the
machinery is library code in `tf_transform_conv.training` (schedules,
callbacks, run folder, data pipelines and augmentations, strategies) and
`tf_transform_conv.distill`.

`--help` and argument errors answer before TensorFlow is imported; its
start-up log lines are left out unless `TF_CPP_MIN_LOG_LEVEL` is set
(`quiet_tensorflow_startup`, from the `tfconv` launcher module).

    python examples/train.py --preset cifar10 --mode dense --run-dir runs/r20
    python examples/train.py --preset cifar10 --mode transform --base-ratio 0.25
    python examples/train.py --preset cifar10 --mode prune --init-from runs/r20/ckpt/last.keras
    python examples/train.py --preset imagenet --data-dir /data/tfds --strategy mirrored
    python examples/train.py --dataset digits --epochs 5       # offline, no download

The `paper-*` presets are the paper's experiments (Miles and Mikolajczyk,
"Reconstructing Pruned Filters using Cheap Spatial Transformations"): global
magnitude (or Taylor) pruning with a linear schedule, the `n mod M`
assignment, the scalar family, two depth groups and a minimum number of bases
per layer. The README lists each with its command and the published number.

    python examples/train.py --preset paper-resnet56 --final-sparsity 0.7
    python examples/train.py --preset paper-vgg16 --final-sparsity 0.8
    python examples/train.py --preset paper-resnet50 --data-dir /data/tfds
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
import warnings

from tfconv import quiet_tensorflow_startup  # installed with the package; imports no TensorFlow

# Defaults per preset; any flag given on the command line wins.
PRESETS = {
    "cifar10": dict(
        dataset="cifar10", model="resnet20", image_size=32, epochs=200, batch_size=128,
        lr=0.1, schedule="cosine", lr_steps=[0.5, 0.75], warmup_epochs=1,
        weight_decay=5e-4, label_smoothing=0.0,
    ),
    "imagenet": dict(
        dataset="imagenet2012", model="resnet50", image_size=224, epochs=90, batch_size=256,
        lr=0.1, schedule="step", lr_steps=[1 / 3, 2 / 3, 8 / 9], warmup_epochs=5,
        weight_decay=1e-4, label_smoothing=0.1,
    ),
}
# The paper's recipe. What the paper states: templates chosen by one global
# saliency threshold (magnitude; first-order Taylor for VGG) raised linearly
# over the first 40 epochs, `n mod M` assignment, the scalar family, 2 groups,
# at least 8 templates per layer on CIFAR-10 and 32 on ImageNet, 300 epochs,
# SGD with step decay and crop / flip / rotation on CIFAR-10, AdamW with the
# rate decayed every 25 epochs and MixUp 0.1 / CutMix 1.0 on ImageNet. What
# it does not state, and is chosen here: the rates, milestones, decay factors
# and weight decays below, a 15-degree rotation, one pruning step per epoch.
# `--final-sparsity` defaults to the middle of the paper's three results.
_PAPER = dict(
    mode="prune", epochs=300, prune_begin=0.0, prune_end=40 / 300, prune_power=1.0,
    prune_every_epoch=True, depth_groups=2, allocation="global", assign="modulo",
    transforms="identity", transform_family="scalar", scale=False, warmup_epochs=0,
    label_smoothing=0.0,
)
_PAPER_CIFAR = dict(
    _PAPER, dataset="cifar10", image_size=32, batch_size=128, optimizer="sgd", lr=0.1,
    schedule="step", lr_steps=[0.5, 0.75], weight_decay=5e-4, rotation=15.0, min_bases=8,
)
PRESETS.update({
    "paper-resnet56": dict(_PAPER_CIFAR, model="resnet56", criterion="magnitude",
                           final_sparsity=0.7),
    "paper-vgg16": dict(_PAPER_CIFAR, model="vgg16_cifar", criterion="taylor",
                        final_sparsity=0.8),
    "paper-resnet50": dict(
        _PAPER, dataset="imagenet2012", model="resnet50", image_size=224, batch_size=256,
        optimizer="adamw", lr=5e-4, schedule="linear-steps",
        lr_steps=[k * 25 / 300 for k in range(1, 12)], weight_decay=0.05, mixup=0.1,
        cutmix=1.0, min_bases=32, criterion="magnitude", subtract_mean=True,
        final_sparsity=0.4,
    ),
})
# Flags whose default is not None, and so cannot tell "not given" apart:
# their defaults live here and presets may override them.
DEFAULTS = dict(
    mode="dense", optimizer="sgd", transform_family="discrete", criterion="reconstruction",
    allocation="per_layer", assign="fit", min_bases=1, subtract_mean=False,
    final_sparsity=0.75, prune_begin=0.0, prune_end=0.5, prune_power=3.0,
    prune_every_epoch=False, depth_groups=1, rotation=0.0, mixup=0.0, cutmix=0.0,
)
DATASETS = ("cifar10", "imagenet2012", "digits", "synthetic")
MODES = ("dense", "transform", "prune", "convert")
FAMILIES = ("discrete", "scalar", "rotation", "affine", "general")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    # What to train.
    add("--preset", choices=sorted(PRESETS), default="cifar10",
        help="dataset, model and schedule defaults (cifar10); paper-*: the paper's "
        "experiments; flags override them")
    add("--dataset", choices=DATASETS, help="the data (the preset's)")
    add("--data-dir", type=pathlib.Path, default=None,
        help="tensorflow_datasets folder (tfds default: ~/tensorflow_datasets)")
    add("--synthetic-size", type=int, default=256,
        help="images of --dataset synthetic, 1/4 more for the test split (256)")
    add("--image-size", type=int, help="input height and width (the preset's: 32 or 224)")
    add("--model", help="a name of tf_transform_conv.models.MODELS (the preset's)")
    add("--mode", choices=MODES, help="how the model is made (dense; paper-*: prune)")
    add("--width", type=float, default=1.0,
        help="factor on every layer's filters of the model built (1); with --mode dense, "
        "the thin network a compressed model of equal parameters must beat (its "
        "results.json names that width thin_width)")
    add("--base-ratio", type=float, default=0.25,
        help="transform/convert: fraction of filters learned as bases (0.25)")
    add("--transforms", default=None,
        help="transform: a preset or comma-separated names (default for the ratio); "
        "prune/convert: the candidates (d4; paper-*: identity)")
    add("--depth-groups", type=int, help="TransformConv2D depth groups (1; paper-*: 2)")
    add("--transform-family", choices=FAMILIES,
        help="transforms of the rebuilt filters: discrete, or a learned family "
        "(discrete; paper-*: scalar)")
    add("--scale", action=argparse.BooleanOptionalAction, default=None,
        help="a trainable scale per filter (off for transform, on for prune/convert)")
    add("--final-sparsity", type=float,
        help="prune: final fraction of filters rebuilt as transforms (0.75)")
    add("--prune-begin", type=float,
        help="prune: start of the schedule, as a fraction of training (0.0)")
    add("--prune-end", type=float,
        help="prune: end of the schedule, as a fraction of training (0.5; paper-*: 40/300)")
    add("--prune-power", type=float,
        help="prune: exponent of tfmot's PolynomialDecay (3; paper-*: 1, linear)")
    add("--prune-frequency", type=int, default=0,
        help="prune: steps between pruning steps (0: about 20 over the schedule)")
    add("--prune-every-epoch", action=argparse.BooleanOptionalAction,
        help="prune: one pruning step per epoch, overriding --prune-frequency "
        "(off; paper-*: on)")
    add("--criterion", choices=("reconstruction", "l1", "magnitude", "taylor"),
        help="prune/convert: which filters stay bases (reconstruction; paper-*: "
        "magnitude, taylor for vgg16)")
    add("--allocation", choices=("per_layer", "global"),
        help="prune/convert: each layer to the sparsity, or one global ranking "
        "(per_layer; paper-*: global)")
    add("--min-bases", type=int,
        help="prune/convert: fewest bases a layer keeps (1; paper-*: 8, 32 on ImageNet)")
    add("--assign", choices=("fit", "modulo"),
        help="prune/convert: a rebuilt filter's base: the best one, or o mod n "
        "(fit; paper-*: modulo)")
    add("--subtract-mean", action=argparse.BooleanOptionalAction,
        help="global allocation ranks saliency minus the layer's mean "
        "(off; paper-resnet50: on)")
    add("--recalibrate-batches", type=int, default=0,
        help="prune/convert: re-estimate batch-norm statistics from this many "
        "training batches after each pruning step or the conversion (0: off)")
    add("--init-from", type=pathlib.Path, default=None,
        help="a dense .keras checkpoint to start prune/convert (or any mode) from")
    # Distillation.
    add("--teacher", type=pathlib.Path, default=None, help="a .keras teacher to distil from")
    add("--kd-temperature", type=float, default=4.0, help="distillation temperature T (4)")
    add("--kd-weight", type=float, default=0.9,
        help="weight w of the distillation term; 1 - w goes to cross-entropy (0.9)")
    add("--inner-kd-weight", type=float, default=0.0,
        help="inner distillation (needs --teacher): weight gamma of the mean squared error "
        "between student and teacher features at --inner-kd-layers, added to the loss "
        "beside the output distillation (--kd-weight 0 for inner alone) (0: off)")
    add("--inner-kd-layers", nargs="+", default=None,
        help="layers (names in both models) whose outputs inner distillation matches "
        "(default: the student's last feature map, the input of global pooling)")
    # Training.
    add("--epochs", type=int, help="training epochs (the preset's)")
    add("--batch-size", type=int, help="global batch size (the preset's)")
    add("--steps-per-epoch", type=int, default=None,
        help="training steps per epoch (training images // batch size)")
    add("--optimizer", choices=("sgd", "adamw"),
        help="SGD with Nesterov momentum, or AdamW (sgd; paper-resnet50: adamw)")
    add("--lr", type=float, help="peak learning rate (the preset's, scaled by batch/256 "
        "for imagenet, batch/512 for paper-resnet50)")
    add("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    add("--schedule", choices=("cosine", "step", "linear-steps"),
        help="learning-rate decay (the preset's)")
    add("--lr-steps", type=float, nargs="+", help="fractions of training where the rate "
        "drops: 10x (step), or to (1 - fraction) x peak (linear-steps) (the preset's)")
    add("--warmup-epochs", type=float, help="linear warm-up epochs (the preset's)")
    add("--weight-decay", type=float, help="decoupled weight decay of the optimizer, "
        "not applied to biases and BatchNorm (the preset's)")
    add("--label-smoothing", type=float, help="label smoothing (the preset's)")
    add("--rotation", type=float,
        help="random rotation of training images, in degrees either way (0; "
        "paper CIFAR presets: 15)")
    add("--mixup", type=float, help="MixUp alpha (0: off; paper-resnet50: 0.1)")
    add("--cutmix", type=float, help="CutMix alpha (0: off; paper-resnet50: 1.0); with "
        "--mixup, each batch gets one of the two at random")
    add("--jit-compile", action=argparse.BooleanOptionalAction, default=True,
        help="compile the training step with XLA (on)")
    add("--mixed-precision", choices=("off", "mixed_float16", "mixed_bfloat16"),
        default="off", help="Keras dtype policy (off: float32)")
    add("--strategy", choices=("default", "mirrored", "multiworker"), default="default",
        help="tf.distribute strategy; multiworker reads TF_CONFIG (default)")
    add("--cpu-devices", type=int, default=0,
        help="split the CPU into this many logical devices before TensorFlow starts, "
        "e.g. to try --strategy mirrored without GPUs (0: leave it)")
    add("--seed", type=int, default=0, help="seed of the data order and weights (0)")
    # Runs that last.
    add("--run-dir", type=pathlib.Path, default=None,
        help="checkpoints, logs and results.json (runs/<mode>-<timestamp>)")
    add("--resume", action="store_true",
        help="require a backup in --run-dir to continue from (restarting the same "
        "command continues anyway)")
    add("--fresh", action="store_true",
        help="delete the run folder's outputs (backup, checkpoints, logs, results, "
        "final model) and start over; needed to retrain a finished run")
    add("--tflite", action=argparse.BooleanOptionalAction, default=True,
        help="export the final model with export_tflite and record its size (on)")
    add("--verbose", type=int, choices=(0, 1, 2), default=1,
        help="Keras verbosity: 0 silent, 1 progress bars, 2 a line per epoch (1)")
    return parser


def usage_error(message):
    """Exits as argparse does for a bad argument: usage, `message`, exit status 2."""
    build_parser().error(message)


def parse_args(argv=None):
    """The arguments, presets applied, or a usage error; imports no TensorFlow.

    What only the package can decide (the model name, the transforms; see
    `check_model_flags`) and what needs the files read (`--init-from`,
    `--teacher`; see `load_model_flag`) is checked in `run`, before the run
    folder is created.
    """
    parser = build_parser()
    args = parser.parse_args(argv)

    for key, value in {**DEFAULTS, **PRESETS[args.preset]}.items():
        if getattr(args, key) is None and key != "lr":
            setattr(args, key, value)
    if args.lr is None:
        args.lr = PRESETS[args.preset]["lr"]
        if args.preset == "imagenet":
            args.lr *= args.batch_size / 256
        elif args.preset == "paper-resnet50":
            args.lr *= args.batch_size / 512
    if args.scale is None:
        args.scale = args.mode in ("prune", "convert")
    if args.run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.run_dir = pathlib.Path("runs") / f"{args.dataset}-{args.model}-{args.mode}-{stamp}"
    problems = []
    not_finite = [f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()
                  for value in (value if isinstance(value, list) else [value])
                  if isinstance(value, float) and not math.isfinite(value)]
    if not_finite:
        problems.append(f"numbers must be finite (got {', '.join(not_finite)})")
    if args.lr <= 0 or args.prune_power <= 0:
        problems.append(f"--lr and --prune-power must be > 0 (got {args.lr:g}, "
                        f"{args.prune_power:g})")
    if not 0 <= args.momentum < 1 or not 0 <= args.label_smoothing < 1:
        problems.append(f"--momentum and --label-smoothing must be in [0, 1) (got "
                        f"{args.momentum:g}, {args.label_smoothing:g})")
    if args.warmup_epochs < 0 or args.weight_decay < 0:
        problems.append(f"--warmup-epochs and --weight-decay must be >= 0 (got "
                        f"{args.warmup_epochs:g}, {args.weight_decay:g})")
    if args.seed < 0 or args.cpu_devices < 0 or args.prune_frequency < 0:
        problems.append(f"--seed, --cpu-devices and --prune-frequency must be >= 0 (got "
                        f"{args.seed}, {args.cpu_devices}, {args.prune_frequency})")
    if args.lr_steps and not all(0 <= f <= 1 for f in args.lr_steps):
        problems.append(f"--lr-steps are fractions of training, in [0, 1] (got "
                        f"{' '.join(f'{f:g}' for f in args.lr_steps)})")
    if args.epochs < 1 or args.batch_size < 1:
        problems.append(f"--epochs and --batch-size must be >= 1 (got {args.epochs}, "
                        f"{args.batch_size})")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        problems.append(f"--steps-per-epoch must be >= 1 (got {args.steps_per_epoch})")
    if args.image_size < 1 or args.synthetic_size < 1 or args.depth_groups < 1:
        problems.append(f"--image-size, --synthetic-size and --depth-groups must be >= 1 "
                        f"(got {args.image_size}, {args.synthetic_size}, {args.depth_groups})")
    if not 0 < args.base_ratio <= 1:
        problems.append(f"--base-ratio must be in (0, 1] (got {args.base_ratio:g})")
    if args.min_bases < 1 or args.recalibrate_batches < 0:
        problems.append(f"--min-bases must be >= 1 and --recalibrate-batches >= 0 (got "
                        f"{args.min_bases}, {args.recalibrate_batches})")
    if args.rotation < 0 or args.mixup < 0 or args.cutmix < 0:
        problems.append(f"--rotation, --mixup and --cutmix must be >= 0 (got "
                        f"{args.rotation}, {args.mixup}, {args.cutmix})")
    if not 0 <= args.final_sparsity < 1:
        problems.append(f"--final-sparsity must be in [0, 1) (got {args.final_sparsity})")
    if not 0 <= args.prune_begin <= args.prune_end <= 1:
        problems.append("need 0 <= --prune-begin <= --prune-end <= 1 (got "
                        f"{args.prune_begin}, {args.prune_end})")
    if not 0 <= args.kd_weight <= 1 or args.kd_temperature <= 0:
        problems.append(f"--kd-weight must be in [0, 1] and --kd-temperature > 0 (got "
                        f"{args.kd_weight}, {args.kd_temperature})")
    if args.inner_kd_weight < 0:
        problems.append(f"--inner-kd-weight must be >= 0 (got {args.inner_kd_weight})")
    if (args.inner_kd_weight > 0 or args.inner_kd_layers) and args.teacher is None:
        problems.append("--inner-kd-weight and --inner-kd-layers need --teacher")
    if args.teacher is not None and args.kd_weight == 0 and args.inner_kd_weight == 0:
        problems.append("--teacher with --kd-weight 0 needs --inner-kd-weight > 0 "
                        "(nothing to distil)")
    if args.subtract_mean and args.allocation != "global":
        problems.append("--subtract-mean needs --allocation global (got "
                        f"--allocation {args.allocation})")
    if args.dataset == "digits" and args.image_size < 8:
        problems.append(f"--dataset digits needs --image-size >= 8 (got {args.image_size})")
    if args.resume and args.fresh:
        problems.append("--resume and --fresh contradict each other")
    existing = next(p for p in [args.run_dir, *args.run_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        problems.append(f"--run-dir {args.run_dir}: "
                        + ("is a file, not a folder" if existing == args.run_dir
                           else f"cannot be made: {existing} is a file, not a folder"))
    elif not os.access(existing, os.W_OK):
        problems.append(f"--run-dir {args.run_dir}: {existing} is not writable")
    if args.teacher is not None and not args.teacher.is_file():
        problems.append(f"--teacher {args.teacher}: no such file")
    if args.init_from is not None and not args.init_from.is_file():
        problems.append(f"--init-from {args.init_from}: no such file")
    if not 0 < args.width <= 4:
        problems.append(f"--width must be in (0, 4], got {args.width}")
    if args.width != 1 and args.init_from is not None:
        problems.append("--width builds a model from scratch; --init-from brings its own "
                        "widths")
    if problems:
        parser.error("; ".join(problems))
    if args.transforms and "," in args.transforms:
        args.transforms = [t.strip() for t in args.transforms.split(",")]
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # --help and argument errors end here, before TensorFlow loads

with quiet_tensorflow_startup():
    import keras
    import tensorflow as tf

    from tf_transform_conv import Reconstruction
    from tf_transform_conv import UpdateTransformPruningStep
    from tf_transform_conv import build_model
    from tf_transform_conv import conv_factory
    from tf_transform_conv import export_tflite
    from tf_transform_conv import prune_model
    from tf_transform_conv import strip_model
    from tf_transform_conv import transform_model
    from tf_transform_conv.cli import load_model_file
    from tf_transform_conv.cost import model_cost
    from tf_transform_conv.distill import InnerDistiller
    from tf_transform_conv.distill import last_feature_map
    from tf_transform_conv.models import DEFAULT_TRANSFORMS
    from tf_transform_conv.models import MODELS
    from tf_transform_conv.models import WIDTH_MODELS
    from tf_transform_conv.models import thin_width
    from tf_transform_conv.training import augment
    from tf_transform_conv.training import data
    from tf_transform_conv.training import distribute
    from tf_transform_conv.training.callbacks import TrainClock
    from tf_transform_conv.training.callbacks import read_backup
    from tf_transform_conv.training.files import write_json_atomic
    from tf_transform_conv.training.report import environment
    from tf_transform_conv.training.report import layer_details
    from tf_transform_conv.training.runs import finished_run
    from tf_transform_conv.training.runs import run_callbacks
    from tf_transform_conv.training.runs import run_folder
    from tf_transform_conv.training.runs import start_over
    from tf_transform_conv.training.runs import trim_csv
    from tf_transform_conv.training.schedules import learning_rate_schedule
    from tf_transform_conv.training.schedules import pruning_schedule
    from tf_transform_conv.ops.transforms import PRESETS as TRANSFORM_PRESETS
    from tf_transform_conv.ops.transforms import resolve_transforms


def check_model_flags(args):
    """Usage errors the package decides: `--model`, and `--base-ratio` with `--transforms`."""
    if args.model not in MODELS:
        usage_error(f"--model {args.model}: no such model; the models are "
                    f"{', '.join(sorted(MODELS))}")
    if args.width != 1 and args.model not in WIDTH_MODELS:
        usage_error(f"--width: {args.model} has no width; the models with one are "
                    f"{', '.join(WIDTH_MODELS)}")
    if args.mode != "transform":
        return
    ratio = args.base_ratio
    if args.transforms is None:
        count = round(1 / ratio)
        if count not in DEFAULT_TRANSFORMS or not math.isclose(ratio * count, 1.0, rel_tol=1e-6):
            usage_error(
                f"--mode transform --base-ratio {ratio:g}: default transforms exist only "
                f"for --base-ratio {', '.join(f'{1 / n:g}' for n in sorted(DEFAULT_TRANSFORMS))}; "
                "for another ratio pass --transforms with 1/ratio transforms (comma-separated "
                f"names, or a preset: {', '.join(TRANSFORM_PRESETS)})")
    else:
        given = args.transforms if isinstance(args.transforms, str) else ",".join(args.transforms)
        try:
            names = resolve_transforms(args.transforms)
        except ValueError as error:
            usage_error(f"--transforms {given}: {error}")
        if not math.isclose(ratio * len(names), 1.0, rel_tol=1e-6):
            usage_error(
                f"--mode transform: --transforms {given} rebuilds {len(names)} "
                f"filters from each base, so --base-ratio must be 1/{len(names)} = "
                f"{1 / len(names):g} (got {ratio:g})")
    try:
        model_conv(args)
    except ValueError as error:  # what the flags above do not cover, in the package's words
        usage_error(f"--mode transform: {error}")


def load_model_flag(args, flag, path, num_classes):
    """The model file of `flag` (`--init-from`, `--teacher`), checked against the data.

    A usage error when it is not a Keras model file, or its input or output
    does not fit the `--image-size` RGB images and the dataset's classes.
    """
    try:
        model = load_model_file(path)
    except ValueError as error:
        usage_error(f"{flag} {error}")
    if not getattr(model, "inputs", None):  # a subclassed model states no shapes
        return model
    wanted = (args.image_size, args.image_size, 3)
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    if len(shapes) != 1 or len(shapes[0]) != 3 or any(
            d is not None and d != w for d, w in zip(shapes[0], wanted)):
        hint = ""
        if len(shapes) == 1 and len(shapes[0]) == 3 and shapes[0][0] == shapes[0][1] \
                and shapes[0][0] is not None:
            hint = f"; pass --image-size {shapes[0][0]} to train on its input size"
        usage_error(f"{flag} {path}: the model takes inputs of shape "
                    f"{', '.join(str(s) for s in shapes)}, but the data are {wanted} images "
                    f"(--image-size {args.image_size}, RGB){hint}")
    outputs = [tuple(t.shape[1:]) for t in model.outputs]
    if outputs != [(num_classes,)]:
        usage_error(f"{flag} {path}: the model outputs {', '.join(str(s) for s in outputs)}, "
                    f"but {args.dataset} has {num_classes} classes")
    return model


# ----------------------------------------------------------------------------
# Data (tf_transform_conv.training.data, .augment)


def load_tfds(args):
    """`(train, test, num_train, num_test)` of `--dataset` from TensorFlow Datasets, or an exit
    with the library's message: what to install or download, and where."""
    try:
        return data.load_tfds(args.dataset, args.data_dir)
    except data.DatasetUnavailableError as error:
        raise SystemExit(f"--dataset {args.dataset}: {error} Offline, --dataset digits or "
                         "--dataset synthetic need neither TensorFlow Datasets nor a "
                         "download.") from None


def make_batch_augment(args):
    """The batch augmentation of `--rotation`, `--mixup`, `--cutmix`, or None."""
    return augment.batch_augment(args.rotation, args.mixup, args.cutmix, seed=args.seed)


def make_datasets(args, num_classes, start_epoch=0):
    """`(train, test, num_train, num_test, steps_per_epoch)`: batched, augmented, one-hot.

    `train` is endless, the batches of `data.training_stream` from epoch
    `start_epoch` on (a restart continues the data of the run it continues).
    """
    if args.dataset in data.TFDS_DATASETS:
        train, test, num_train, num_test = load_tfds(args)
    else:
        if args.dataset == "digits":
            x_train, x_test, y_train, y_test = data.digits_images(args.image_size)
        else:
            x_train, x_test, y_train, y_test = data.synthetic_images(
                args.image_size, args.synthetic_size, num_classes, args.seed)
        train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        test = tf.data.Dataset.from_tensor_slices((x_test, y_test))
        num_train, num_test = len(x_train), len(x_test)
    if num_train < args.batch_size:
        usage_error(f"--batch-size {args.batch_size} is larger than the {num_train} "
                    f"training images of {args.dataset}")
    steps_per_epoch = args.steps_per_epoch or num_train // args.batch_size
    train, test = data.classification_datasets(
        train, test, num_train, args.dataset, num_classes, args.batch_size, args.image_size,
        seed=args.seed, start_batch=start_epoch * steps_per_epoch,
        batch_augment=make_batch_augment(args))
    return train, test, num_train, num_test, steps_per_epoch


# ----------------------------------------------------------------------------
# Model


def model_conv(args):
    if args.mode != "transform":
        return conv_factory()
    return conv_factory(base_ratio=args.base_ratio, transforms=args.transforms,
                        depth_groups=args.depth_groups, scale=args.scale,
                        transform_family=args.transform_family)


def reconstruction(args):
    """How pruned filters are rebuilt: the settings `prune_model` and `transform_model` share."""
    return Reconstruction(
        transforms=args.transforms or "d4", transform_family=args.transform_family,
        criterion=args.criterion, assign=args.assign, scale=args.scale,
        depth_groups=args.depth_groups, allocation=args.allocation,
        min_bases=args.min_bases, subtract_mean=args.subtract_mean)


def equal_size_thin_network(args, num_classes, params):
    """`{"thin_width", "thin_params"}`: the dense `--model` of `params` parameters.

    A compressed model is worth its name only if it beats this network
    trained as long; None for a dense run at its own width, and where the
    model has no width or is smaller than any width builds.
    """
    if args.mode == "dense" or args.model not in WIDTH_MODELS:
        return dict(thin_width=None, thin_params=None)
    try:
        width, thin_params = thin_width(args.model, params, num_classes=num_classes,
                                        input_shape=(args.image_size, args.image_size, 3))
    except ValueError:  # more parameters than the dense model: no thinner network
        return dict(thin_width=None, thin_params=None)
    return dict(thin_width=width, thin_params=thin_params)


def make_model(args, num_classes, steps_per_epoch, run_dir, train=None, chief=True,
               init_model=None, resuming=False):
    """`(model, origin, conversion)`: the model to train (wrapped for pruning, converted, ...).

    `origin` says how it was made; `conversion` is, in convert mode, the
    report of `transform_model` (a dict per convolution), else None.
    `init_model`: the `--init-from` model to start from, or None to build
    `--model` from scratch. A conversion is saved to `converted.keras` and
    `converted.json`; a run `resuming` from a backup reloads them, as the
    backup's weights belong to that assignment. Only the chief writes them;
    other workers compute the same conversion (deterministic from the same
    weights) without writing.
    """
    conversion = None
    if init_model is not None:
        model, origin = init_model, f"weights of {args.init_from}"
    else:
        widths = {} if args.width == 1 else dict(width=args.width)
        model = build_model(args.model, num_classes=num_classes, conv=model_conv(args),
                            input_shape=(args.image_size, args.image_size, 3), **widths)
        origin = "from scratch"
        if args.mode == "convert":
            warnings.warn("--mode convert without --init-from converts a freshly "
                          "initialised dense model; pass a trained dense checkpoint.")
    if args.mode == "prune":
        frequency = steps_per_epoch if args.prune_every_epoch else args.prune_frequency or None
        schedule = pruning_schedule(args.epochs * steps_per_epoch, args.final_sparsity,
                                    args.prune_begin, args.prune_end, args.prune_power, frequency)
        model = prune_model(model, schedule, reconstruction(args))
        origin += (f"; pruned at steps {schedule.begin_step}..{schedule.end_step} every "
                   f"{schedule.frequency} ({args.criterion}, {args.allocation}, {args.assign})")
    elif args.mode == "convert":
        converted, report = run_dir / "converted.keras", run_dir / "converted.json"
        if resuming and converted.is_file():  # the same assignment as before
            model = load_model_file(converted)
            conversion = json.loads(report.read_text()) if report.is_file() else None
        else:
            model, layers = transform_model(
                model, base_ratio=args.base_ratio, reconstruction=reconstruction(args),
                recalibrate=train if args.recalibrate_batches else None,
                recalibrate_batches=max(1, args.recalibrate_batches))
            conversion = [layer.to_dict() for layer in layers]
            if chief:
                model.save(converted)
                write_json_atomic(report, conversion)
        origin += f"; converted to base ratio {args.base_ratio}"
    return model, origin, conversion


def distil(args, model, teacher):
    """`model` wrapped in an `InnerDistiller` of `teacher` as the `--kd-*` flags say."""
    layers = []
    if args.inner_kd_weight > 0:
        layers = args.inner_kd_layers or [last_feature_map(model)]
        print(f"inner distillation at {layers} (gamma={args.inner_kd_weight})")
    distiller = InnerDistiller(model, teacher, layers, weight=args.inner_kd_weight,
                               output_weight=args.kd_weight, temperature=args.kd_temperature)
    distiller.build((None, args.image_size, args.image_size, 3))
    print(f"distilling from {args.teacher} (T={args.kd_temperature}, w={args.kd_weight})")
    return distiller


# ----------------------------------------------------------------------------
# Training


def make_optimizer(args, steps_per_epoch):
    """SGD (Nesterov) or AdamW on `learning_rate_schedule`, decoupled weight decay off biases
    and normalisation parameters."""
    total = args.epochs * steps_per_epoch
    schedule = learning_rate_schedule(
        args.schedule, args.lr, total, warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        boundaries=[round(f * total) for f in args.lr_steps])
    if args.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=args.momentum, nesterov=True,
                                         weight_decay=args.weight_decay or None)
    if args.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "scale"])
    return optimizer


def compile_model(model, args, optimizer, num_classes):
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 10:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=args.label_smoothing),
        metrics=metrics,
        jit_compile=args.jit_compile,
    )


def export_final(model, path):
    """`(ExportResult, None)` of the exported `.tflite` file, or `(None, reason)` if export failed."""
    try:
        return export_tflite(model, path), None
    except Exception as error:  # recorded, never fatal: the training is done
        return None, f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------
# The run


def main(argv=None, args=None):
    """Trains as the command line `argv` says; returns the results (None on a non-chief).

    `args`: the arguments already parsed (as the script does, before
    importing TensorFlow); `argv` is then only recorded in the results.
    """
    if args is None:
        args = parse_args(argv)
    try:
        distribute.configure_cpu_devices(args.cpu_devices)
    except RuntimeError as error:
        raise SystemExit(f"--cpu-devices {args.cpu_devices}: {error}") from None
    previous_policy = keras.config.dtype_policy()
    if args.mixed_precision != "off":
        keras.mixed_precision.set_global_policy(args.mixed_precision)
    try:
        return run(args, argv)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def run(args, argv):
    strategy = distribute.make_strategy(args.strategy)
    chief = distribute.is_chief(strategy)
    check_model_flags(args)
    run_dir = args.run_dir
    backup_dir = run_dir / "backup"
    if not chief:  # workers back up apart; only the chief writes the run folder
        backup_dir = run_dir / f"backup-worker-{strategy.cluster_resolver.task_id}"
    if args.fresh:
        start_over(run_dir, backup_dir, chief)
    else:
        finished = finished_run(run_dir, backup_dir)
        if finished is not None:
            usage_error(f"{finished}. Rerunning would train from scratch over it: pass "
                        "--fresh to delete its outputs and start over, or another --run-dir.")
    backup = read_backup(backup_dir)
    resumed_at = None if backup is None else backup["epoch"]
    if args.resume and resumed_at is None:
        usage_error(f"--resume: no backup in {backup_dir} to continue from")
    if args.jit_compile and strategy.num_replicas_in_sync > 1 and not tf.config.list_logical_devices("GPU"):
        # XLA cannot reach a variable replica on another logical CPU device
        # ("resource located in device CPU:1"); multi-worker CPU runs were not
        # tried with XLA, so they get the same (safe) treatment.
        warnings.warn("--jit-compile is turned off: several replicas on CPUs "
                      f"({strategy.num_replicas_in_sync}); XLA fails with replicas on "
                      "several logical CPU devices")
        args.jit_compile = False
    keras.utils.set_random_seed(args.seed)

    # Data.
    num_classes = data.NUM_CLASSES.get(args.dataset,
                                       data.NUM_CLASSES[PRESETS[args.preset]["dataset"]])
    train, test, num_train, num_test, steps_per_epoch = make_datasets(
        args, num_classes, start_epoch=resumed_at or 0)
    print(f"{args.dataset}: {num_train} train / {num_test} test images, "
          f"{args.image_size}x{args.image_size}x3, {num_classes} classes; "
          f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size} "
          f"on {strategy.num_replicas_in_sync} replica(s)")

    # The models given as files, checked before anything is written.
    init_model = teacher = None
    with strategy.scope():
        if args.init_from is not None and args.mode == "transform":
            warnings.warn("--init-from is ignored by --mode transform (trained from scratch)")
        elif args.init_from is not None:
            init_model = load_model_flag(args, "--init-from", args.init_from, num_classes)
        if args.teacher is not None:
            teacher = load_model_flag(args, "--teacher", args.teacher, num_classes)

    with run_folder(run_dir, backup_dir, chief):
        # Model.
        with strategy.scope():
            model, origin, conversion = make_model(
                args, num_classes, steps_per_epoch, run_dir, train, chief=chief,
                init_model=init_model, resuming=resumed_at is not None)
            print(f"model {model.name} ({args.mode}, {origin}): {model.count_params():,} parameters")
            trained = model if teacher is None else distil(args, model, teacher)
            optimizer = make_optimizer(args, steps_per_epoch)
            compile_model(trained, args, optimizer, num_classes)

        # Training.
        if resumed_at is not None:
            print(f"resuming after epoch {resumed_at} from {backup_dir}")
        if chief:  # the CSV is the chief's; a non-chief's backup says nothing of it
            trim_csv(run_dir / "log.csv", resumed_at or 0)
        clock = TrainClock(before=0.0 if backup is None else backup["train_seconds"])
        pruning = []
        if args.mode == "prune":
            pruning.append(UpdateTransformPruningStep(
                saliency_data=train if args.criterion == "taylor" else None,
                recalibrate_data=train if args.recalibrate_batches else None,
                recalibrate_batches=max(1, args.recalibrate_batches)))
        callbacks = run_callbacks(run_dir, model, backup_dir, clock, chief, between=pruning)
        clock.start()
        history = trained.fit(
            train, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
            validation_data=test, callbacks=callbacks, verbose=args.verbose, shuffle=False,
        )
        train_seconds = clock.seconds()
        epochs_done = history.epoch[-1] + 1 if history.epoch else (resumed_at or 0)

        # Results.
        with strategy.scope():
            final = strip_model(model) if args.mode == "prune" else model
            compile_model(final, args, make_optimizer(args, steps_per_epoch), num_classes)
        scores = final.evaluate(test, verbose=0, return_dict=True)
        if not chief:
            return None
        final.save(run_dir / "final.keras")
        cost = model_cost(final)
        exported, tflite_skipped = None, "--no-tflite"
        if args.tflite:
            exported, tflite_skipped = export_final(final, run_dir / "model.tflite")
        tflite_bytes = None if exported is None else int(exported.bytes)
        thin = equal_size_thin_network(args, num_classes, int(cost.params))
        command = sys.argv if argv is None else [__file__, *argv]
        results = {
            "command": " ".join(str(part) for part in command),
            "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
            "model": final.name,
            "mode": args.mode,
            "origin": origin,
            "dataset": args.dataset,
            "epochs": epochs_done,
            "epochs_requested": args.epochs,
            "resumed_from_epoch": resumed_at,
            "steps_per_epoch": steps_per_epoch,
            "optimizer_steps": int(keras.ops.convert_to_numpy(optimizer.iterations)),
            "test_accuracy": float(scores["accuracy"]),
            "test_top5": float(scores["top5"]) if "top5" in scores else None,
            "test_loss": float(scores["loss"]),
            "last_epoch_logs": {k: float(v[-1]) for k, v in history.history.items()},
            "params": int(cost.params),
            "macs": int(cost.macs),
            "dense_macs": int(cost.dense_macs),
            **thin,
            "tflite_bytes": tflite_bytes,
            "tflite_skipped": None if exported is not None else tflite_skipped,
            "layers": layer_details(final, conversion,
                                    None if exported is None else exported.lowerings),
            "train_seconds": train_seconds,
            "replicas": strategy.num_replicas_in_sync,
            **environment(),
            "finished": epochs_done == args.epochs,
        }
        write_json_atomic(run_dir / "results.json", results)
        top5 = "" if results["test_top5"] is None else f", top-5 {results['test_top5']:.4f}"
        print(f"\n{final.name} ({args.mode}): test accuracy {results['test_accuracy']:.4f}{top5}, "
              f"{results['params']:,} parameters, {results['macs']:,} multiply-adds, .tflite "
              + (f"{tflite_bytes:,} bytes" if tflite_bytes is not None else f"skipped ({tflite_skipped})"))
        if thin.get("thin_width") is not None:
            print(f"the dense {args.model} of equal size, the network to beat: --mode dense "
                  f"--width {thin['thin_width']:g} ({thin['thin_params']:,} parameters), "
                  f"trained {args.epochs} epochs")
        print(f"run folder: {run_dir}")
        return results


if __name__ == "__main__":
    main(args=ARGS)
