"""The `tfconv` command's launcher: arguments first, TensorFlow after, quietly.

    tfconv cost MODEL.keras [--json OUT.json]
    tfconv analyze MODEL.keras [--out-dir DIR] [--sparsities 0.25 0.5 0.75]
    tfconv export MODEL.keras OUT.tflite [--quantization dynamic|float16|int8]
                  [--representative SAMPLES.npy] [--batch-size 1]
                  [--lowering auto|grouped|slices|dense]

A module of its own, outside the `tf_transform_conv` package (whose import
loads Keras and TensorFlow, to register its layers): `--help` and argument
errors answer without importing TensorFlow, and the commands, which live in
`tf_transform_conv.cli`, are imported under `quiet_tensorflow_startup`, so
that TensorFlow's start-up log lines are left out unless
`TF_CPP_MIN_LOG_LEVEL` is set. `examples/train.py` uses the same context
manager.
"""

import argparse
import contextlib
import os
import re
import sys
import tempfile

__all__ = ["STARTUP_NOISE", "build_parser", "main", "quiet_tensorflow_startup"]

# Lines TensorFlow's libraries print while they load and start their devices,
# before absl logging is initialised and so whatever TF_CPP_MIN_LOG_LEVEL
# says: absl-format info and warning lines ("I0000 00:00:1712.345 123
# port.cc:153] oneDNN custom operations are on..."), errors of the CUDA
# set-up ("E0000 ... cuda_executor.cc:1228] failed call to cuInit: ...", on a
# machine without a GPU; "... cuda_dnn.cc:8310] Unable to register cuDNN
# factory ..."), absl's notice about them and the second line of the
# CPU-instructions notice.
STARTUP_NOISE = re.compile(
    r"[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
    r"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cu\w*\.cc:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: "
)


@contextlib.contextmanager
def quiet_tensorflow_startup():
    """Imports made under it print none of TensorFlow's start-up log lines.

    Unless `TF_CPP_MIN_LOG_LEVEL` is set (then nothing changes: the user
    chose what to see), it is set to 3 (TensorFlow's C++ logging: fatal
    only; a failure still reaches Python as an exception), absl's Python
    logging is set to errors, and while the block runs the process's stderr
    (the file descriptor, which C++ writes to) goes to a file: afterwards
    every line but the `STARTUP_NOISE` ones is written to stderr. If the
    block imported TensorFlow, its physical devices are listed before stderr
    is restored: CUDA starts then, and on a machine without a GPU its
    initialisation error is left out too. (Listing physical devices leaves
    logical devices still to be configured.)
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
                tf = sys.modules.get("tensorflow")
                if tf is not None:
                    tf.config.list_physical_devices()
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                lines = captured.read().decode(errors="replace").splitlines(keepends=True)
                sys.stderr.write("".join(line for line in lines
                                         if not STARTUP_NOISE.match(line)))
                sys.stderr.flush()
    finally:
        os.close(saved)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _sparsity(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}")
    return value


def build_parser():
    """The `tfconv` argument parser; `args.command` names the command to run."""
    parser = argparse.ArgumentParser(
        prog="tfconv", description="Tools for compact CNNs built with TransformConv2D.",
        epilog="TensorFlow's start-up log lines are left out unless TF_CPP_MIN_LOG_LEVEL "
        "is set.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser(
        "cost", help="parameters and multiply-adds of a .keras model, per layer"
    )
    cost.add_argument("model", help="path to a .keras file")
    cost.add_argument("--json", help="also write the figures as JSON to this path")
    analyze = commands.add_parser(
        "analyze", help="how well each Conv2D's filters are rebuilt by each transform"
    )
    analyze.add_argument("model", help="path to a .keras file")
    analyze.add_argument(
        "--out-dir", default=".",
        help="where analysis.json and analysis.png go (.); the plot needs matplotlib",
    )
    analyze.add_argument(
        "--sparsities", type=_sparsity, nargs="+", default=[0.25, 0.5, 0.75],
        help="fractions of filters to reconstruct (0.25 0.5 0.75)",
    )
    analyze.add_argument("--seed", type=_seed, default=0, help="seed of the random baseline")
    export = commands.add_parser(
        "export", help="write a .tflite file holding only the base filters, and check it"
    )
    export.add_argument("model", help="path to a .keras file")
    export.add_argument("output", help="the .tflite file to write")
    export.add_argument(
        "--quantization", choices=["float32", "dynamic", "float16", "int8"],
        default="float32", help="weight/activation types (float32)",
    )
    export.add_argument(
        "--representative", metavar="NPY",
        help="a .npy file of sample inputs (num_samples, *input_shape), for int8",
    )
    export.add_argument("--batch-size", type=_positive_int, default=1,
                        help="the file's batch (1)")
    export.add_argument(
        "--lowering", choices=["auto", "grouped", "slices", "dense"], default="auto",
        help="how TransformConv2D layers are written: grouped convolutions, "
        "slices and additions, or the dense kernel (auto: per layer, the fastest "
        "compact form where the file holds it in fewer bytes than the dense kernel, "
        "in int8 files 15%% fewer; dense for few-channel stems and elsewhere)",
    )
    export.add_argument(
        "--verify-samples", type=_positive_int, default=8,
        help="random inputs for the float check (8)",
    )
    export.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs")
    return parser


def main(argv=None):
    """Runs `tfconv` with `argv` (default: the command line); returns the exit status.

    Parses first (`--help` and argument errors exit here, TensorFlow not
    imported), then imports `tf_transform_conv.cli` under
    `quiet_tensorflow_startup` and runs the command there.
    """
    args = build_parser().parse_args(argv)
    with quiet_tensorflow_startup():
        from tf_transform_conv import cli
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
