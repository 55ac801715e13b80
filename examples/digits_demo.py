"""Offline demo: the same small CNN with `Conv2D` and with `TransformConv2D`.

Trains on scikit-learn's handwritten digits (8x8 grayscale, 1797 images,
shipped with scikit-learn, so nothing is downloaded) a small CNN built once
with `keras.layers.Conv2D` and once per base ratio with `TransformConv2D`,
then prints a table of test accuracy, parameters, multiply-adds and training
time. Every model is saved as a `.keras` file in the run folder, reloaded
with `safe_mode=True` and checked to give the same predictions; the results
go to `results.json` beside them.

    python examples/digits_demo.py                  # `make demo`
    python examples/digits_demo.py --ratios 1/2 1/4 1/8 --epochs 40
    python examples/digits_demo.py --quick          # 1 epoch, a smoke test
"""

import argparse
import datetime
import fractions
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from tf_transform_conv import Reconstruction  # noqa: E402
from tf_transform_conv import TransformConv2D  # noqa: E402
from tf_transform_conv import UpdateTransformPruningStep  # noqa: E402
from tf_transform_conv import model_cost  # noqa: E402
from tf_transform_conv import prune_model  # noqa: E402
from tf_transform_conv import strip_model  # noqa: E402
from tf_transform_conv.ops import transforms as transforms_lib  # noqa: E402

# The transforms that reconstruct the other filters from each base, per base
# ratio: with the default assignment, `filters = base_filters * len(transforms)`.
# For ratio 1/2, rot180 pairs each edge or stroke detector with its
# opposite-polarity twin, the most common near-copy among learned filters.
TRANSFORMS_FOR_RATIO = {
    fractions.Fraction(1, 2): ("identity", "rot180"),
    fractions.Fraction(1, 4): "rotations",
    fractions.Fraction(1, 8): "d4",
}


def parse_ratio(text):
    """`"1/4"` or `"0.25"` -> Fraction(1, 4), limited to the ratios with a preset."""
    try:
        ratio = fractions.Fraction(text).limit_denominator(64)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if ratio not in TRANSFORMS_FOR_RATIO:
        valid = ", ".join(str(r) for r in TRANSFORMS_FOR_RATIO)
        raise argparse.ArgumentTypeError(
            f"no transform set for base ratio {text}; choose from {valid}"
        )
    return ratio


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=30, help="training epochs per model (30)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (32)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=3e-3,
        help="peak Adam learning rate, decayed to 0 on a cosine (0.003)",
    )
    parser.add_argument(
        "--ratios",
        type=parse_ratio,
        nargs="+",
        default=[fractions.Fraction(1, 2), fractions.Fraction(1, 4)],
        metavar="RATIO",
        help="base ratios (base_filters / filters) of the TransformConv2D "
        "models, each one of "
        + ", ".join(str(r) for r in TRANSFORMS_FOR_RATIO)
        + " (1/2 1/4); the Conv2D model always runs",
    )
    parser.add_argument(
        "--implementation",
        choices=("auto", "materialized", "factored"),
        default="auto",
        help="TransformConv2D execution path; 'auto' (the default) lets each "
        "layer pick the cheaper one for its shapes, and the table's 'paths' "
        "column says which ran",
    )
    parser.add_argument(
        "--test-size", type=float, default=0.25, help="held-out test fraction (0.25)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split and the weights (0)"
    )
    parser.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the training step with XLA (on)",
    )
    parser.add_argument(
        "--run-dir",
        type=pathlib.Path,
        default=None,
        help="where the models and results.json go (runs/digits-<timestamp>)",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="Keras verbosity: 0 silent, 1 progress bars (the default), 2 one "
        "line per epoch",
    )
    parser.add_argument(
        "--prune-epochs",
        type=int,
        default=20,
        help="fine-tuning epochs of the pruning path, from the trained Conv2D "
        "model (20; 0 skips it)",
    )
    parser.add_argument(
        "--prune-sparsity",
        type=float,
        default=0.75,
        help="final fraction of filters rebuilt as transforms (0.75)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 epoch per model, for tests"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error(
            f"--epochs and --batch-size must be at least 1; received "
            f"--epochs {args.epochs} --batch-size {args.batch_size}"
        )
    if not 0 <= args.prune_sparsity < 1 or args.prune_epochs < 0:
        parser.error(
            "--prune-sparsity must be in [0, 1) and --prune-epochs at least 0; "
            f"received {args.prune_sparsity} and {args.prune_epochs}"
        )
    if args.quick:
        args.epochs = 1
        args.prune_epochs = min(args.prune_epochs, 1)
    if args.run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.run_dir = pathlib.Path("runs") / f"digits-{stamp}"
    return args


# ----------------------------------------------------------------------------
# Data


def load_data(test_size, seed):
    """Digits as `(n, 8, 8, 1)` float32 in [0, 1], split stratified by class."""
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(
        images,
        digits.target.astype("int32"),
        test_size=test_size,
        stratify=digits.target,
        random_state=seed,
    )


def training_batches(x, y, batch_size, seed):
    """Reshuffled full batches. Dropping the last, partial batch keeps one batch
    shape, so the training step is traced and XLA-compiled once, not twice."""
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


# ----------------------------------------------------------------------------
# Model


def dense_conv(filters, **kwargs):
    """The conv factory of the baseline: a plain `keras.layers.Conv2D`."""
    return keras.layers.Conv2D(filters, **kwargs)


def transform_conv(ratio, implementation="auto"):
    """A conv factory: `TransformConv2D` with `ratio` of the filters learned."""
    transforms = TRANSFORMS_FOR_RATIO[ratio]

    def factory(filters, **kwargs):
        return TransformConv2D(
            filters,
            base_ratio=float(ratio),
            transforms=transforms,
            implementation=implementation,
            **kwargs,
        )

    return factory


def variants(ratios, implementation):
    """`(name, base ratio, transforms, conv factory)`: Conv2D, then one per ratio."""
    yield "conv2d", "1", None, dense_conv
    for ratio in ratios:
        transforms = transforms_lib.resolve_transforms(TRANSFORMS_FOR_RATIO[ratio])
        name = f"transform-{ratio.numerator}-{ratio.denominator}"
        yield name, str(ratio), list(transforms), transform_conv(ratio, implementation)


def build_cnn(conv_factory, input_shape=(8, 8, 1), num_classes=10, name="cnn"):
    """Conv(32)-Conv(32)-MaxPool-Conv(64)-GlobalAvgPool-Dense(10).

    `conv_factory(filters, **kwargs)` makes every convolution, so the model
    code is the same whatever the conv type.

    The first convolution is a factory one too, so a transformed model is
    transformed throughout. It sees a single input channel, so its kernel is
    small either way (288 weights dense, 144 or 72 transformed), and
    rotated or mirrored stroke detectors suit raw pixels as well as deeper
    features; keeping it a plain Conv2D would save nothing worth a branch.
    """
    conv = dict(kernel_size=3, padding="same", activation="relu")
    inputs = keras.Input(input_shape)
    x = conv_factory(32, name="conv1", **conv)(inputs)
    x = conv_factory(32, name="conv2", **conv)(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = conv_factory(64, name="conv3", **conv)(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# ----------------------------------------------------------------------------
# Training and checks


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (the first one includes tracing and compiling)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def compile_and_fit(model, data, args, epochs, learning_rate, callbacks=()):
    """Adam on a cosine decay; returns the training figures of a results row."""
    x_train, _, y_train, _ = data
    batches = training_batches(x_train, y_train, args.batch_size, args.seed)
    steps = epochs * (len(x_train) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=args.jit_compile,
    )
    timer = EpochTimer()
    start = time.perf_counter()
    history = model.fit(
        batches,
        epochs=epochs,
        shuffle=False,  # the dataset reshuffles itself
        callbacks=[timer, *callbacks],
        verbose=args.verbose,
    )
    train_seconds = time.perf_counter() - start
    steady = timer.seconds[1:] or timer.seconds
    return {
        "train_accuracy": float(history.history["accuracy"][-1]),
        "train_loss": float(history.history["loss"][-1]),
        "train_seconds": train_seconds,
        "seconds_per_epoch": float(np.median(steady)),
    }


def evaluate_and_save(name, model, data, args):
    """Test accuracy, cost, and a `.keras` round trip checked in `safe_mode`."""
    _, x_test, _, y_test = data
    # The test set is 450 tiny images: one eager call is quicker than tracing
    # and compiling `evaluate`/`predict` for every model.
    logits = keras.ops.convert_to_numpy(model(x_test, training=False))
    accuracy = float(np.mean(logits.argmax(-1) == y_test))

    path = args.run_dir / f"{name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    reloaded_logits = keras.ops.convert_to_numpy(reloaded(x_test, training=False))
    max_diff = float(np.max(np.abs(logits - reloaded_logits)))
    reload_match = bool(
        np.allclose(logits, reloaded_logits, rtol=1e-5, atol=1e-5)
        and np.array_equal(logits.argmax(-1), reloaded_logits.argmax(-1))
    )
    print(
        f"{name}: saved {path} ({path.stat().st_size / 1024:.0f} KiB); reloaded "
        f"with safe_mode=True: predictions "
        f"{'match' if reload_match else 'DIFFER'} (max |diff| {max_diff:.2e})"
    )
    cost = model_cost(model)
    return {
        "implementations": {
            layer.name: layer.implementation_used
            for layer in model.layers
            if isinstance(layer, TransformConv2D)
        },
        "test_accuracy": accuracy,
        "params": int(cost.params),
        "conv_params": int(
            sum(r.params for r in cost.layers if r.class_name in ("Conv2D", "TransformConv2D"))
        ),
        "macs": int(cost.macs),
        "adds": int(cost.adds),
        "dense_macs": int(cost.dense_macs),
        "cost": cost.to_dict(),
        "saved_model": path.name,
        "saved_bytes": path.stat().st_size,
        "reload_match": reload_match,
        "reload_max_abs_diff": max_diff,
    }


def train_and_evaluate(name, conv_factory, data, args):
    """Trains a model built with `conv_factory`; returns `(row, model)`."""
    keras.utils.set_random_seed(args.seed)  # same initial draws for every variant
    model = build_cnn(conv_factory, name=name)
    training = compile_and_fit(model, data, args, args.epochs, args.learning_rate)
    row = evaluate_and_save(name, model, data, args)
    row.update(training)
    return row, model


def prune_and_strip(dense, data, args):
    """Generalised pruning of the trained dense model, then stripping.

    A tfmot `PolynomialDecay` takes every 3x3 convolution from 0 to
    `--prune-sparsity` over the first two thirds of the fine-tuning steps;
    pruned filters are rebuilt as d4 transforms of kept ones, each with a
    scale. The stripped model holds compact `TransformConv2D` layers.
    """
    # tfmot is only imported where its schedule is needed.
    import tensorflow_model_optimization as tfmot

    steps = args.prune_epochs * (len(data[0]) // args.batch_size)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=args.prune_sparsity,
        begin_step=0,
        end_step=max(1, 2 * steps // 3),
        frequency=max(1, steps // 30),
    )
    keras.utils.set_random_seed(args.seed)
    wrapped = prune_model(
        dense, schedule, reconstruction=Reconstruction(transforms="d4", scale=True))
    training = compile_and_fit(
        wrapped, data, args, args.prune_epochs, args.learning_rate,
        callbacks=[UpdateTransformPruningStep()],
    )
    stripped = strip_model(wrapped)
    row = evaluate_and_save(f"pruned-{round(args.prune_sparsity * 100)}", stripped, data, args)
    row.update(training)
    return row


# ----------------------------------------------------------------------------
# Results


def write_json_atomic(path, payload):
    """Writes `payload` to `path` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def format_paths(implementations):
    """`{"conv1": "materialized", "conv2": "factored"}` -> `"MF"`; `"-"` if none."""
    return "".join(path[0].upper() for path in implementations.values()) or "-"


def format_table(rows):
    header = (
        f"{'model':<14} {'base ratio':>10} {'test acc':>8} {'params':>8} {'conv prm':>8} "
        f"{'mult-adds':>10} {'adds':>9} {'paths':>6} {'train s':>8} {'s/epoch':>8} "
        f"{'reload':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['model']:<14} {row['base_ratio']:>10} {row['test_accuracy']:>8.4f} "
            f"{row['params']:>8,} {row['conv_params']:>8,} {row['macs']:>10,} {row['adds']:>9,} "
            f"{format_paths(row['implementations']):>6} "
            f"{row['train_seconds']:>8.1f} {row['seconds_per_epoch']:>8.2f} "
            f"{'ok' if row['reload_match'] else 'FAILED':>6}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)

    data = load_data(args.test_size, args.seed)
    if args.batch_size > len(data[0]):
        raise ValueError(
            f"--batch-size {args.batch_size} exceeds the {len(data[0])} training "
            "images; every batch is full, so none would run."
        )
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test images, 8x8x1; "
        f"{args.epochs} epochs, batch {args.batch_size}, "
        f"jit_compile={args.jit_compile}"
    )

    rows = []
    for name, ratio, transforms, factory in variants(args.ratios, args.implementation):
        print(f"\n== {name} (base ratio {ratio}, transforms {transforms})")
        row = {"model": name, "base_ratio": ratio, "transforms": transforms}
        result, model = train_and_evaluate(name, factory, data, args)
        row.update(result)
        rows.append(row)
        if name == "conv2d":
            dense = model

    if args.prune_epochs > 0:
        kept = fractions.Fraction(1) - fractions.Fraction(args.prune_sparsity).limit_denominator(64)
        print(
            f"\n== pruning the trained conv2d model to sparsity {args.prune_sparsity} "
            f"(d4 reconstructions, {args.prune_epochs} epochs), then stripping"
        )
        row = {"model": None, "base_ratio": str(kept), "transforms": ["d4"]}
        row.update(prune_and_strip(dense, data, args))
        row["model"] = f"pruned-{round(args.prune_sparsity * 100)}"
        rows.append(row)

    settings = dict(
        vars(args), run_dir=str(args.run_dir), ratios=[str(r) for r in args.ratios]
    )
    command = sys.argv if argv is None else [__file__, *argv]
    results = {
        "command": " ".join(str(part) for part in command),
        "args": settings,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "tensorflow": tf.__version__,
        },
        "rows": rows,
    }
    write_json_atomic(args.run_dir / "results.json", results)

    print("\n" + format_table(rows))
    print(
        "\nmult-adds: multiply-adds per image of the paths that ran; adds: the "
        "factored path's additions;\npaths: per TransformConv2D layer, "
        "M = materialized, F = factored; train s includes compiling."
    )
    print(f"\nrun folder: {args.run_dir}")
    return results


if __name__ == "__main__":
    main()
