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
(`training_stream`). Rerunning a finished run is refused, with a pointer to
`--fresh`, which deletes the run's outputs and starts over; a start that fails
before its first epoch is saved removes what it created. TensorBoard logs, a
CSV log and `results.json` (accuracy, parameters, multiply-adds, `.tflite`
size, and per `TransformConv2D` its bases, transforms, conversion error and
`.tflite` lowering) go to the run folder.

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
import contextlib
import csv
import datetime
import json
import math
import os
import pathlib
import platform
import secrets
import shutil
import sys
import time
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
    transform_family="scalar", scale=False, warmup_epochs=0, label_smoothing=0.0,
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
NUM_CLASSES = {"cifar10": 10, "imagenet2012": 1000, "digits": 10}
FAMILIES = ("discrete", "scalar", "rotation", "affine", "general")
# Per-channel statistics of the training images (RGB, in [0, 1]).
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGENET_MANUAL = (
    "ImageNet (imagenet2012) cannot be downloaded automatically. Download "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
    "https://image-net.org/download-images (a free account is needed) and put "
    "both files, as they are, into {manual}/ ; the first run then prepares the "
    "dataset there (hours, about 300 GB of disk). Pass the same --data-dir."
)
CIFAR_OFFLINE = (
    "CIFAR-10 is not prepared in {data_dir} and could not be downloaded ({error}). "
    "On a machine with internet access run\n"
    "    python -c \"import tensorflow_datasets as tfds; tfds.load('cifar10', data_dir='DIR')\"\n"
    "(it fetches https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, 163 MB) and "
    "copy DIR/cifar10/ to {data_dir}/cifar10/, or put cifar-10-binary.tar.gz into "
    "{data_dir}/downloads/manual/. Offline, --dataset digits or synthetic need no download."
)


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
    add("--base-ratio", type=float, default=0.25,
        help="transform/convert: fraction of filters learned as bases (0.25)")
    add("--transforms", default=None,
        help="transform: a preset or comma-separated names (default for the ratio); "
        "prune/convert: the candidates (d4)")
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
    if args.resume and args.fresh:
        problems.append("--resume and --fresh contradict each other")
    if args.teacher is not None and not args.teacher.is_file():
        problems.append(f"--teacher {args.teacher}: no such file")
    if args.init_from is not None and not args.init_from.is_file():
        problems.append(f"--init-from {args.init_from}: no such file")
    if problems:
        parser.error("; ".join(problems))
    if args.transforms and "," in args.transforms:
        args.transforms = [t.strip() for t in args.transforms.split(",")]
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # --help and argument errors end here, before TensorFlow loads

with quiet_tensorflow_startup():
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_transform_conv import Reconstruction
    from tf_transform_conv import TransformConv2D
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
    from tf_transform_conv.models import DEFAULT_TRANSFORMS
    from tf_transform_conv.models import MODELS
    from tf_transform_conv.ops.transforms import PRESETS as TRANSFORM_PRESETS
    from tf_transform_conv.ops.transforms import resolve_transforms


def check_model_flags(args):
    """Usage errors the package decides: `--model`, and `--base-ratio` with `--transforms`."""
    if args.model not in MODELS:
        usage_error(f"--model {args.model}: no such model; the models are "
                    f"{', '.join(sorted(MODELS))}")
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
# Devices and strategy


def configure_devices(cpu_devices):
    """Splits the first CPU into `cpu_devices` logical devices (before TF starts them)."""
    if cpu_devices < 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices
        )
    except RuntimeError as error:
        raise SystemExit(
            f"--cpu-devices {cpu_devices}: TensorFlow has already started its devices "
            f"in this process ({error}); run the script in a fresh process."
        ) from None


def make_strategy(name):
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        patch_keras_for_multiworker()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def patch_keras_for_multiworker():
    """Works around two Keras 3 bugs that stop `fit` under MultiWorkerMirroredStrategy.

    Both are in `keras.src.backend.tensorflow.trainer` and only hit with
    several workers (keras-team/keras#20585); with one worker, or
    MirroredStrategy, Keras takes other paths and this changes nothing.

    1. Before training, Keras builds the model from one batch and first
       `strategy.reduce`s the whole `(x, y)` tuple of per-replica tensors,
       which fails across workers ("Attempt to convert a value (PerReplica...)
       ... to a Tensor"). The batch serves only for its shapes and dtypes: this
       worker's own batch is passed instead.
    2. Each step averages the replicas' metric results (scalars) with
       `strategy.reduce("MEAN", v, axis=0)`, a mean over the batch axis too,
       which scalars lack ("Invalid reduction dimension 0 for input with 0
       dimensions"). The mean across replicas, `axis=None`, is what is meant.
    """
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "patched_for_multiworker", False):
        return
    missing = [name for name in ("reduce_per_replica", "_collective_all_reduce_multi_worker")
               if not hasattr(trainer, name)]
    if missing or not hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build"):
        warnings.warn(f"Keras {keras.__version__} differs from the one patched for "
                      "--strategy multiworker; training may fail")
        return

    symbolic_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: v.values[0] if isinstance(v, tf.distribute.DistributedValues)
                    else v, next(batches))
                break
            iterator = None
        return symbolic_build(self, iterator=iterator, data_batch=data_batch)

    reduce_per_replica = trainer.reduce_per_replica

    def reduce_across_replicas(values, strategy, reduction):
        if (reduction in ("auto", "mean")
                and trainer._collective_all_reduce_multi_worker(strategy)):
            return keras.tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_across_replicas
    trainer.patched_for_multiworker = True


def is_chief(strategy):
    """Whether this worker writes the run folder (always, except multiworker non-chiefs)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


# ----------------------------------------------------------------------------
# Data


def normalize(image, mean_std):
    image = tf.cast(image, tf.float32) / 255.0
    if mean_std is None:
        return image
    mean, std = mean_std
    return (image - tf.constant(mean)) / tf.constant(std)


def cifar_train_augment(image, seed, size=32):
    """Pads 4 pixels, crops a random `size` x `size` window, flips left-right at random.

    `seed`: shape (2,) integers; the same seed gives the same crop and flip.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.resize_with_crop_or_pad(image, size + 8, size + 8)
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def imagenet_train_crop(encoded, seed, size=224):
    """Random resized crop (area 8-100%, aspect 3/4-4/3) of a JPEG, resized, flipped.

    `seed`: shape (2,) integers; the same seed gives the same crop and flip.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(encoded)
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros((1, 0, 4)), seed=crop_seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, (size, size), method="bilinear")
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def imagenet_eval_crop(encoded, size=224):
    """Resizes the shorter side to `size / 0.875` and takes the centre `size` x `size`."""
    image = tf.image.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / 0.875) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bilinear")
    return tf.image.resize_with_crop_or_pad(image, size, size)


def load_tfds(args):
    """`(train, test, num_train, num_test)` unbatched `(uint8 image, label)` datasets."""
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as error:
        if error.name != "tensorflow_datasets":
            raise
        raise SystemExit(
            f"--dataset {args.dataset} reads TensorFlow Datasets, which is not installed: "
            "pip install tensorflow-datasets (or pip install -e '.[examples]'); offline, "
            "--dataset digits or --dataset synthetic need neither it nor a download."
        ) from None

    data_dir = None if args.data_dir is None else str(args.data_dir)
    shown = data_dir or os.path.expanduser("~/tensorflow_datasets")
    kwargs = dict(data_dir=data_dir, as_supervised=True, with_info=True)
    try:
        if args.dataset == "imagenet2012":
            (train, test), info = tfds.load(
                "imagenet2012", split=["train", "validation"], download=False,
                decoders={"image": tfds.decode.SkipDecoding()}, **kwargs,
            )
        else:
            (train, test), info = tfds.load("cifar10", split=["train", "test"], **kwargs)
    except Exception as error:  # tfds raises many kinds when offline or missing
        if args.dataset == "imagenet2012":
            manual = pathlib.Path(shown) / "downloads" / "manual"
            raise SystemExit(
                IMAGENET_MANUAL.format(manual=manual) + f"\n(tfds said: {error})"
            ) from None
        raise SystemExit(
            CIFAR_OFFLINE.format(data_dir=shown, error=f"{type(error).__name__}: {error}")
        ) from None
    splits = info.splits
    test_split = "validation" if args.dataset == "imagenet2012" else "test"
    return train, test, splits["train"].num_examples, splits[test_split].num_examples


def digits_images(size):
    """scikit-learn's 8x8 digits, upsampled (nearest) and tiled to `size` x `size` x 3 uint8."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype("uint8")
    factor = max(1, size // 8)
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    pad = size - images.shape[1]
    images = np.pad(images, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    images = np.repeat(images[..., None], 3, axis=-1)
    return train_test_split(images, digits.target.astype("int64"), test_size=0.25,
                            stratify=digits.target, random_state=0)


def synthetic_images(size, count, num_classes, seed):
    """Random uint8 images with random labels: a pipeline check, nothing to learn."""
    rng = np.random.default_rng(seed)
    n_test = max(1, count // 4)
    images = rng.integers(0, 256, (count + n_test, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, count + n_test).astype("int64")
    return images[:count], images[count:], labels[:count], labels[count:]


def training_stream(examples, num_train, batch_size, seed, start_batch=0, augment=None,
                    window=50_000):
    """The training examples from batch `start_batch` on of one endless, seeded stream.

    The stream is pass after pass over `examples`, cut to whole batches (the
    last `num_train % batch_size` examples of each pass's order sit that pass
    out). Pass `p` permutes the examples within consecutive windows of
    `window` examples (all of them when `num_train <= window`: CIFAR-10,
    digits, synthetic) in an order that depends only on `(seed, p)`, and
    `augment(image, element_seed)`, if given, gets a stateless seed made of
    `(seed, p, index in the pass)`. So the stream is a function of `seed`
    alone: a run restarted after `e` epochs of `s` steps, started at batch
    `e * s`, sees exactly the examples, in the same batches and with the same
    per-image augmentations, as the uninterrupted run did from there.
    Starting there skips only the examples before it in its pass (before
    any decoding or augmentation). The next window is read while the current
    one is served: up to two windows are held in memory (for ImageNet's
    encoded JPEGs, about 11 GB).

    Returns:
        An unbatched dataset of `(image, label)`; batch it by `batch_size`.
    """
    per_pass = num_train // batch_size * batch_size
    first_pass, skip = divmod(start_batch * batch_size, per_pass)
    window = min(num_train, window)
    fold_in = tf.random.experimental.stateless_fold_in

    def one_pass(p):
        pass_seed = tf.stack([tf.constant(seed, tf.int64), p])

        def permuted(w, block):
            count = tf.shape(tf.nest.flatten(block)[0])[0]
            order = tf.random.experimental.stateless_shuffle(
                tf.range(count), seed=fold_in(pass_seed, w))
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda j: tf.nest.map_structure(lambda t: t[j], block))

        windows = examples.batch(window).prefetch(1).enumerate()
        ordered = windows.flat_map(permuted).take(per_pass)
        return ordered.enumerate().map(
            lambda i, example: (*example, fold_in(pass_seed, i)))

    stream = tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass).skip(skip)
    if augment is None:
        return stream.map(lambda x, y, _: (x, y))
    return stream.map(lambda x, y, element_seed: (augment(x, element_seed), y),
                      num_parallel_calls=tf.data.AUTOTUNE)


def make_datasets(args, num_classes, start_epoch=0):
    """`(train, test, num_train, num_test, steps_per_epoch)`: batched, augmented, prefetched.

    Labels are one-hot. `train` is endless, the batches of `training_stream`
    from epoch `start_epoch` on (a restart continues the data of the run it
    continues). Batch-level augmentations (`--rotation`, `--mixup`,
    `--cutmix`) draw from Keras layers' own random streams, which restart
    with the process.
    """
    size, autotune = args.image_size, tf.data.AUTOTUNE
    if args.dataset in ("cifar10", "imagenet2012"):
        train, test, num_train, num_test = load_tfds(args)
    else:
        if args.dataset == "digits":
            x_train, x_test, y_train, y_test = digits_images(size)
        else:
            x_train, x_test, y_train, y_test = synthetic_images(
                size, args.synthetic_size, num_classes, args.seed)
        train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        test = tf.data.Dataset.from_tensor_slices((x_test, y_test))
        num_train, num_test = len(x_train), len(x_test)
    if num_train < args.batch_size:
        usage_error(f"--batch-size {args.batch_size} is larger than the {num_train} "
                    f"training images of {args.dataset}")
    steps_per_epoch = args.steps_per_epoch or num_train // args.batch_size

    mean_std = MEAN_STD.get(args.dataset)
    if args.dataset == "imagenet2012":
        augment = lambda x, seed: imagenet_train_crop(x, seed, size)  # noqa: E731
        test_map = lambda x, y: (imagenet_eval_crop(x, size), y)  # noqa: E731
    elif args.dataset == "cifar10":
        augment = lambda x, seed: cifar_train_augment(x, seed, size)  # noqa: E731
        test_map = None
    else:  # digits are not flip-invariant; synthetic has nothing to augment
        augment = test_map = None

    def finish(x, y):
        return normalize(x, mean_std), tf.one_hot(y, num_classes)

    batch_augment = make_batch_augment(args)

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = training_stream(train, num_train, args.batch_size, args.seed,
                            start_epoch * steps_per_epoch, augment)
    # Full batches only: one batch shape, so XLA compiles the step once.
    train = (train.map(finish, num_parallel_calls=autotune)
             .batch(args.batch_size, drop_remainder=True))
    if batch_augment is not None:
        train = train.map(batch_augment, num_parallel_calls=autotune)
    train = train.prefetch(autotune).with_options(options)
    if test_map is not None:
        test = test.map(test_map, num_parallel_calls=autotune)
    test = (test.map(finish, num_parallel_calls=autotune)
            .batch(args.batch_size).prefetch(autotune).with_options(options))
    return train, test, num_train, num_test, steps_per_epoch


def make_batch_augment(args):
    """`(images, one-hot labels) -> same` for whole batches, from Keras's augmentation layers.

    A random rotation of each image (`--rotation` degrees either way, the
    corners filled by reflection), then MixUp or CutMix (`--mixup`,
    `--cutmix`: their alpha); with both, each batch takes one of them with
    equal probability, as DeiT's recipe does. None when nothing is on.
    """
    seed = args.seed
    rotate = mix = cut = None
    if args.rotation:
        rotate = keras.layers.RandomRotation(args.rotation / 360.0, fill_mode="reflect",
                                             seed=seed)
    if args.mixup:
        mix = keras.layers.MixUp(alpha=args.mixup, seed=seed + 1)
    if args.cutmix:
        cut = keras.layers.CutMix(factor=args.cutmix, seed=seed + 2)
    if rotate is None and mix is None and cut is None:
        return None

    def apply(layer, images, labels):
        out = layer({"images": images, "labels": labels})
        return out["images"], out["labels"]

    def augment(images, labels):
        if rotate is not None:
            images = rotate(images, training=True)
        if mix is not None and cut is not None:
            return tf.cond(tf.random.uniform(()) < 0.5,
                           lambda: apply(mix, images, labels),
                           lambda: apply(cut, images, labels))
        if mix is not None or cut is not None:
            return apply(mix or cut, images, labels)
        return images, labels

    return augment


# ----------------------------------------------------------------------------
# Model


class Distiller(keras.Model):
    """Trains `student` on `(1 - w) * CE(y, s) + w * T^2 * KL(softmax(t/T) || softmax(s/T))`.

    Calling it calls the student; the teacher is frozen and runs in
    inference mode. The compiled loss is the cross-entropy term; the
    distillation term is tracked as the metric `kd_loss`.
    """

    def __init__(self, student, teacher, temperature=4.0, weight=0.9, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.kl = keras.losses.KLDivergence(name="kd")
        self.kd_tracker = keras.metrics.Mean(name="kd_loss")

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def kd_loss(self, teacher_logits, student_logits):
        """`T^2 * KL(softmax(t/T) || softmax(s/T))`, batch mean, in float32."""
        t = self.temperature
        p_teacher = keras.ops.softmax(keras.ops.cast(teacher_logits, "float32") / t)
        p_student = keras.ops.softmax(keras.ops.cast(student_logits, "float32") / t)
        return (t * t) * self.kl(p_teacher, p_student)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        ce = super().compute_loss(x, y, y_pred, sample_weight, training)
        teacher_logits = self.teacher(x, training=False)
        kd = self.kd_loss(teacher_logits, y_pred)
        self.kd_tracker.update_state(keras.src.losses.loss.unscale_loss_for_distribution(kd))
        return (1.0 - self.weight) * ce + self.weight * kd

    @property
    def metrics(self):
        return [*super().metrics, self.kd_tracker]


def last_feature_map(model):
    """The name of the last layer of `model` with a 4D output: the features before pooling."""
    for layer in reversed(model.layers):
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"Model '{model.name}' has no layer with a 4D output to distil; "
                     "name the layers with --inner-kd-layers.")


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
    input_shape = (args.image_size, args.image_size, 3)
    conversion = None
    if init_model is not None:
        model = init_model
        origin = f"weights of {args.init_from}"
    else:
        model = build_model(args.model, num_classes=num_classes, conv=model_conv(args),
                            input_shape=input_shape)
        origin = "from scratch"
        if args.mode == "convert":
            warnings.warn("--mode convert without --init-from converts a freshly "
                          "initialised dense model; pass a trained dense checkpoint.")
    total_steps = args.epochs * steps_per_epoch
    if args.mode == "prune":
        import tensorflow_model_optimization as tfmot  # only here: it switches tf.keras

        begin = int(args.prune_begin * (total_steps - 1))
        end = max(begin, int(args.prune_end * (total_steps - 1)))
        if args.prune_every_epoch:
            frequency = steps_per_epoch
        else:
            frequency = args.prune_frequency or max(1, (end - begin) // 20)
        end = begin + (end - begin) // frequency * frequency  # the last step prunes
        if end == begin:  # a schedule shorter than one pruning interval: prune once
            end, frequency = begin + 1, 1
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=args.final_sparsity,
            begin_step=begin, end_step=end, power=args.prune_power, frequency=frequency,
        )
        model = prune_model(model, schedule, reconstruction(args))
        origin += (f"; pruned at steps {begin}..{end} every {frequency} "
                   f"({args.criterion}, {args.allocation}, {args.assign})")
    elif args.mode == "convert":
        converted = run_dir / "converted.keras"
        report = run_dir / "converted.json"
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


# ----------------------------------------------------------------------------
# Training


@keras.saving.register_keras_serializable(package="train")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then a decay.

    `kind` is `"cosine"` (to 0 at `total_steps`), `"step"` (10x drops at
    `boundaries`, in steps) or `"linear-steps"` (at each boundary `b` the rate
    becomes `peak * (1 - b / total_steps)`: a staircase under the line from
    `peak` to 0).
    """

    def __init__(self, peak, total_steps, warmup_steps=0, kind="cosine", boundaries=()):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.boundaries = [int(b) for b in boundaries]

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = float(max(1, self.warmup_steps))
        warmup = self.peak * (step + 1.0) / warm
        if self.kind == "cosine":
            span = float(max(1, self.total_steps - self.warmup_steps))
            progress = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            decayed = 0.5 * self.peak * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.kind == "step":
            drops = sum(keras.ops.cast(step >= b, "float32") for b in self.boundaries)
            decayed = self.peak * keras.ops.power(0.1, drops)
        else:
            passed = sum(keras.ops.cast(step >= b, "float32") * (b - a) for a, b in
                         zip([0, *self.boundaries], self.boundaries))
            decayed = self.peak * (1.0 - passed / float(max(1, self.total_steps)))
        return keras.ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps,
                    warmup_steps=self.warmup_steps, kind=self.kind,
                    boundaries=self.boundaries)


def make_optimizer(args, steps_per_epoch):
    total = args.epochs * steps_per_epoch
    schedule = WarmupSchedule(
        args.lr, total, round(args.warmup_epochs * steps_per_epoch), args.schedule,
        [round(f * total) for f in args.lr_steps],
    )
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


class TrainClock:
    """Seconds of training across restarts: those before this process, plus its own."""

    def __init__(self, before=0.0):
        self.before = float(before)
        self.started = None

    def start(self):
        """Starts counting this process's seconds (once; later calls change nothing)."""
        if self.started is None:
            self.started = time.perf_counter()

    def seconds(self):
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.before + running


class SaveCheckpoint(keras.callbacks.Callback):
    """Saves `model` to `ckpt/last.keras`, and the epoch and training seconds to `ckpt/last.json`.

    The `.keras` file is the model to reuse (`--init-from`, `--teacher`); the
    backup of `AtomicBackupAndRestore` is what a restart continues from.
    """

    def __init__(self, folder, model, clock):
        super().__init__()
        self.folder = folder
        self.target = model
        self.clock = clock

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "last.tmp.keras"
        self.target.save(tmp)
        os.replace(tmp, self.folder / "last.keras")
        write_json_atomic(self.folder / "last.json",
                          {"epoch": epoch + 1, "train_seconds": self.clock.seconds()})


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose backup a kill never leaves half-written.

    Keras 3.15 writes the weights, then `training_metadata.json`, in place: a
    process killed inside the second write leaves an empty JSON file, on which
    the restart fails (json.JSONDecodeError), and one killed between the two
    pairs new weights with the previous epoch count (the epoch would run
    twice). Here each backup's weights go to a new file named by its epoch,
    then the metadata, naming that file, replaces the old atomically: it is
    the commit point, and a restart always finds a complete, matching pair.
    Older weight files are deleted after the commit. The metadata also
    records `clock`'s training seconds (a `TrainClock`, started with
    training if it is not yet), for a restart to count on from.
    """

    def __init__(self, backup_dir, clock=None, **kwargs):
        super().__init__(backup_dir=backup_dir, **kwargs)
        self.clock = TrainClock() if clock is None else clock

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.clock.start()

    def _save_model(self):
        folder = pathlib.Path(self.backup_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self._current_epoch}-batch-{self._last_batch_seen}.weights.h5"
        self.model.save_weights(str(folder / name), overwrite=True)
        write_json_atomic(pathlib.Path(self._training_metadata_path), {
            "epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name,
            "train_seconds": self.clock.seconds()})
        for old in folder.glob("*.weights.h5"):
            if old.name != name:
                old.unlink()

    def _load_model(self):
        backup = read_backup(pathlib.Path(self.backup_dir))
        if backup is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(str(pathlib.Path(self.backup_dir) / backup["weights"]))
        self.model._initial_epoch = backup["epoch"]


def read_backup(backup_dir):
    """The metadata of a backup (`AtomicBackupAndRestore`): epoch, weights file,
    training seconds (0 for a backup written without them); None without one."""
    path = backup_dir / "training_metadata.json"
    if not path.is_file():
        return None
    backup = json.loads(path.read_text())
    backup["epoch"] = int(backup["epoch"])
    backup.setdefault("train_seconds", 0.0)
    return backup


def trim_csv(path, epochs_done):
    """Drops CSV rows of epochs after the backup (written just before a kill)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < epochs_done]
    if len(kept) != len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)


# ----------------------------------------------------------------------------
# Results


def write_json_atomic(path, payload):
    """Writes `payload` to `path` through a temporary file and a rename.

    The temporary file is created as `open` creates files (mode 0o666 less
    the umask), so the result has the mode of the run's other outputs.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_final(model, path):
    """`(ExportResult, None)` of the exported `.tflite` file, or `(None, reason)` if export failed."""
    try:
        return export_tflite(model, path), None
    except Exception as error:  # recorded, never fatal: the training is done
        return None, f"{type(error).__name__}: {error}"


def layer_details(model, conversion=None, lowerings=None):
    """A dict per `TransformConv2D` of `model`, for `results.json`.

    Its name, filters, bases, transform family and transforms; with
    `conversion` (the report of `transform_model`, dicts) the layer's
    reconstruction error at the conversion; with `lowerings` (of an
    `ExportResult`) how the `.tflite` file writes it.
    """
    errors = {row["name"]: row["error"] for row in conversion or ()}
    details = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, TransformConv2D):
            continue
        row = {"name": layer.name, "filters": layer.filters, "base_filters": layer.base_filters,
               "transform_family": layer.transform_family, "transforms": list(layer.transforms)}
        if conversion is not None:
            row["reconstruction_error"] = errors.get(layer.name)
        if lowerings is not None:
            row["tflite_lowering"] = lowerings.get(layer.name)
        details.append(row)
    return details


# ----------------------------------------------------------------------------
# The run folder

# What a run writes into its folder, besides the backups: what --fresh deletes.
RUN_OUTPUTS = ("ckpt", "converted.keras", "converted.json", "final.keras", "model.tflite",
               "results.json", "log.csv", "tensorboard")


def remove_path(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def finished_run(run_dir, backup_dir):
    """Why restarting in `run_dir` would train from scratch over a finished run, or None.

    A run is finished when `results.json` says so. A checkpoint
    (`ckpt/last.json`) without a backup to continue from is a training that
    ended (Keras deletes the backup then) but was stopped before writing
    `results.json`.
    """
    results = run_dir / "results.json"
    if results.is_file():
        done = json.loads(results.read_text())
        if done.get("finished"):
            return (f"{run_dir} holds a finished run ({done.get('mode')}, {done.get('epochs')} "
                    f"epochs, test accuracy {done.get('test_accuracy', float('nan')):.4f}; "
                    "see its results.json)")
    checkpoint = run_dir / "ckpt" / "last.json"
    if read_backup(backup_dir) is None and checkpoint.is_file():
        epochs = json.loads(checkpoint.read_text()).get("epoch")
        return (f"{run_dir} holds a model trained for {epochs} epochs (ckpt/last.keras) "
                "but no backup to continue from and no finished results.json")
    return None


def start_over(run_dir, backup_dir, chief):
    """`--fresh`: deletes this worker's backup and, on the chief, the run's outputs."""
    remove_path(backup_dir)
    if chief:
        for name in RUN_OUTPUTS:
            remove_path(run_dir / name)


@contextlib.contextmanager
def run_folder(run_dir, backup_dir, chief):
    """Creates `run_dir`; a start that fails before saving an epoch removes what it added.

    The folder is left as this start found it (gone, if it did not exist),
    so that a later run there does not find, say, a `converted.keras` made
    with other arguments. Once an epoch is saved (a backup or
    `ckpt/last.json`) everything stays, for a restart to continue.
    """
    found = set(run_dir.iterdir()) if run_dir.is_dir() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        saved = read_backup(backup_dir) is not None or (run_dir / "ckpt" / "last.json").is_file()
        if chief and not saved:
            for path in run_dir.iterdir():
                if found is None or path not in found:
                    remove_path(path)
            if found is None:
                run_dir.rmdir()
        raise


# ----------------------------------------------------------------------------
# The run


def main(argv=None, args=None):
    """Trains as the command line `argv` says; returns the results (None on a non-chief).

    `args`: the arguments already parsed (as the script does, before
    importing TensorFlow); `argv` is then only recorded in the results.
    """
    if args is None:
        args = parse_args(argv)
    configure_devices(args.cpu_devices)
    previous_policy = keras.config.dtype_policy()
    if args.mixed_precision != "off":
        keras.mixed_precision.set_global_policy(args.mixed_precision)
    try:
        return run(args, argv)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def run(args, argv):
    strategy = make_strategy(args.strategy)
    chief = is_chief(strategy)
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
    num_classes = NUM_CLASSES.get(args.dataset, NUM_CLASSES[PRESETS[args.preset]["dataset"]])
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
            trained = model
            if teacher is not None:
                if args.inner_kd_weight > 0:
                    layers = args.inner_kd_layers or [last_feature_map(model)]
                    trained = InnerDistiller(model, teacher, layers, weight=args.inner_kd_weight,
                                             output_weight=args.kd_weight,
                                             temperature=args.kd_temperature)
                    print(f"inner distillation at {layers} (gamma={args.inner_kd_weight})")
                else:
                    trained = Distiller(model, teacher, args.kd_temperature, args.kd_weight)
                trained.build((None, args.image_size, args.image_size, 3))
                print(f"distilling from {args.teacher} (T={args.kd_temperature}, "
                      f"w={args.kd_weight})")
            optimizer = make_optimizer(args, steps_per_epoch)
            compile_model(trained, args, optimizer, num_classes)

        # Training.
        if resumed_at is not None:
            print(f"resuming after epoch {resumed_at} from {backup_dir}")
        if chief:  # the CSV is the chief's; a non-chief's backup says nothing of it
            trim_csv(run_dir / "log.csv", resumed_at or 0)
        # Order matters. At the end of an epoch the CSV row goes first and the
        # backup after it: a kill in between repeats the row, which `trim_csv`
        # drops on restart (the other order would lose it). At the start the
        # backup is restored before the pruning callback reads the pruning step.
        clock = TrainClock(before=0.0 if backup is None else backup["train_seconds"])
        callbacks = []
        if chief:
            callbacks += [
                keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True),
                keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
            ]
        callbacks.append(AtomicBackupAndRestore(backup_dir=str(backup_dir), clock=clock))
        if args.mode == "prune":
            callbacks.append(UpdateTransformPruningStep(
                saliency_data=train if args.criterion == "taylor" else None,
                recalibrate_data=train if args.recalibrate_batches else None,
                recalibrate_batches=max(1, args.recalibrate_batches)))
        if chief:
            callbacks.append(SaveCheckpoint(run_dir / "ckpt", model, clock))
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
        last = {k: float(v[-1]) for k, v in history.history.items()}
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
            "last_epoch_logs": last,
            "params": int(cost.params),
            "macs": int(cost.macs),
            "dense_macs": int(cost.dense_macs),
            "tflite_bytes": tflite_bytes,
            "tflite_skipped": None if exported is not None else tflite_skipped,
            "layers": layer_details(final, conversion,
                                    None if exported is None else exported.lowerings),
            "train_seconds": train_seconds,
            "replicas": strategy.num_replicas_in_sync,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
            "versions": {"python": platform.python_version(), "keras": keras.__version__,
                         "tensorflow": tf.__version__, "numpy": np.__version__},
            "finished": epochs_done == args.epochs,
        }
        write_json_atomic(run_dir / "results.json", results)
        top5 = "" if results["test_top5"] is None else f", top-5 {results['test_top5']:.4f}"
        print(f"\n{final.name} ({args.mode}): test accuracy {results['test_accuracy']:.4f}{top5}, "
              f"{results['params']:,} parameters, {results['macs']:,} multiply-adds, .tflite "
              + (f"{tflite_bytes:,} bytes" if tflite_bytes is not None else f"skipped ({tflite_skipped})"))
        print(f"run folder: {run_dir}")
        return results


if __name__ == "__main__":
    main(args=ARGS)
