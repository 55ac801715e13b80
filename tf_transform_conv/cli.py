"""The `tfconv` command's commands (the command line is parsed by the `tfconv` launcher).

    tfconv cost MODEL.keras [--json OUT.json]
    tfconv analyze MODEL.keras [--out-dir DIR] [--sparsities 0.25 0.5 0.75]
    tfconv export MODEL.keras OUT.tflite [--quantization dynamic|float16|int8]
                  [--representative SAMPLES.npy] [--batch-size 1]
                  [--lowering auto|grouped|slices|dense]

`cost` prints a model's parameters and multiply-adds per layer (see
`tf_transform_conv.cost`; for a model with sparse weights also its
nonzeros and the multiply-adds of sparse execution) and the model file's
bytes; `analyze` reports, per Conv2D layer, how well
its filters are reconstructed by each transform at a few sparsities, against
random filters of the same shape, and writes `analysis.json` and
`analysis.png` (see `tf_transform_conv.analyze`); `export` writes a `.tflite`
file whose `TransformConv2D`s are written in a compact form (only the bases
are stored; see `export.lowering.lowering_choice`), prints
its size against the parameter bytes and, for float32 and float16 files,
checks it against the Keras model on random inputs (see
`tf_transform_conv.export`).

`analysis.png` needs matplotlib, which the base install leaves out (it is in
the `examples` extra): without it `analyze` writes the table and the JSON and
says in one line how to get the plot. A model file that is missing or is not
a Keras model (`.keras` archive, or legacy `.h5`) is reported in one line,
naming the path and what is wrong, with exit status 2, as are other
unusable arguments.
"""

import collections
import json
import os
import sys
import zipfile

import keras
import numpy as np

from tf_transform_conv import analyze
from tf_transform_conv import export
from tf_transform_conv.cost import model_cost
from tfconv import build_parser  # the parser, in the launcher (which imports no TensorFlow)

_HDF5_SUFFIXES = (".h5", ".hdf5")
_PLOT_MISSING = (
    "analysis.png not written: plotting needs matplotlib, which is not installed "
    "(pip install matplotlib, or pip install 'tf_transform_conv[examples]')"
)


class UsageError(SystemExit):
    """An argument or input file the command cannot use: one line on stderr, exit status 2.

    A `SystemExit` (status 2, as argparse's own errors) whose `str` is the message.
    """

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def load_model_file(path):
    """Loads a Keras model file (safe mode, uncompiled) or says in one line why not.

    Accepts a `.keras` archive (what `model.save("m.keras")` writes) or a
    legacy `.h5`/`.hdf5` file. The package's layers are registered first.

    Raises:
        ValueError: naming `path` and what is wrong with it: missing, a
            folder, another kind of file, not a zip archive (`.keras`) or
            not an HDF5 file (`.h5`), an archive without a model
            configuration, or what Keras raised while rebuilding the model.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a .keras file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".keras":
        what = "not a valid .keras file"
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path}: {what}: it is not a zip archive (a .keras file is the archive "
                "that model.save('model.keras') writes)"
            )
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ValueError(f"{path}: {what}: the archive holds no config.json")
    elif suffix in _HDF5_SUFFIXES:
        import h5py

        what = f"not a valid Keras {suffix} file"
        if not h5py.is_hdf5(path):
            raise ValueError(f"{path}: {what}: it is not an HDF5 file")
    else:
        raise ValueError(
            f"{path}: not a Keras model file: expected a .keras archive "
            f"(model.save('model.keras')) or a legacy .h5 file, got "
            f"{repr(suffix) + ' file' if suffix else 'a name without extension'}"
        )
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # any failure to rebuild: reported, not a traceback
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path}: {what}: Keras could not load it ({type(error).__name__}: {detail})"
        ) from None


def _load(path):
    try:
        return load_model_file(path)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_output_file(path, flag):
    """A UsageError unless a file can be written at `path` (checked before any work)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path}: the folder {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def _check_output_folder(path, flag):
    """A UsageError unless `path` is a folder, or one can be made there (checked before any work)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a file, not a folder")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: cannot be made: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot be made: {parent} is not writable")


def _cost(args):
    if args.json:
        _check_output_file(args.json, "--json")
    cost = model_cost(_load(args.model))
    cost.summary()
    file_bytes = os.path.getsize(args.model)
    print(f"Model file: {file_bytes:,} bytes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**cost.to_dict(), "file_bytes": file_bytes}, f, indent=2)
    return 0


def _analyze(args):
    _check_output_folder(args.out_dir, "--out-dir")
    model = _load(args.model)
    rows = analyze.analyze_model(model, sparsities=args.sparsities, seed=args.seed)
    if not rows:
        raise UsageError(
            f"{args.model}: the model has no Conv2D layer with groups=1 and a "
            "kernel larger than 1x1 to analyse"
        )
    print(analyze.format_rows(rows))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "analysis.json"), "w") as f:
        json.dump({"model": args.model, "rows": [r.to_dict() for r in rows]}, f, indent=2)
    try:
        analyze.plot_rows(rows, os.path.join(args.out_dir, "analysis.png"))
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        print(f"wrote {args.out_dir}/analysis.json; {_PLOT_MISSING}")
    else:
        print(f"wrote {args.out_dir}/analysis.json and analysis.png")
    return 0


def _export(args):
    _check_output_file(args.output, "output")
    if not args.output.endswith(".tflite"):
        # Not a .keras file, the model's own included, overwritten by a flatbuffer.
        raise UsageError(f"output {args.output}: expected a path ending in .tflite")
    if args.quantization == "int8" and not args.representative:
        raise UsageError(
            "--quantization int8 (full integer) calibrates the activation ranges on "
            "sample inputs: pass --representative SAMPLES.npy (a few hundred inputs, "
            "shape (num_samples, *input_shape)), or use --quantization dynamic, which "
            "needs none"
        )
    if args.representative and args.quantization != "int8":
        raise UsageError(
            f"--representative is used only with --quantization int8 "
            f"(got --quantization {args.quantization})"
        )
    representative = None
    if args.representative:
        if not os.path.isfile(args.representative):
            raise UsageError(f"{args.representative}: no such file (--representative)")
        try:
            representative = np.load(args.representative, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"{args.representative}: not a .npy array of sample inputs "
                f"(--representative): {(str(error).splitlines() or [''])[0]}"
            ) from None
    model = _load(args.model)
    quantization = None if args.quantization == "float32" else args.quantization
    try:
        result = export.export_tflite(
            model, args.output, quantization=quantization,
            representative_data=representative, batch_size=args.batch_size,
            lowering=args.lowering,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    per_param = result.param_bytes // max(result.params, 1)
    print(f"wrote {result.path} ({args.quantization}, batch {result.batch_size})")
    print(f"  file size        {result.bytes:>12,} bytes")
    print(
        f"  parameter bytes  {result.param_bytes:>12,} bytes "
        f"({result.params:,} parameters x {per_param} B)"
    )
    print(
        f"  file / params    {result.bytes / max(result.param_bytes, 1):>12.3f}   "
        f"(overhead {result.overhead_bytes:,} bytes, {result.num_ops} operators)"
    )
    if result.lowerings:
        forms = collections.Counter(result.lowerings.values())
        print("  TransformConv2D  " + ", ".join(f"{n} {form}" for form, n in sorted(forms.items())))
    tolerance = {None: 1e-4, "float16": 1e-2}.get(quantization)
    if tolerance is None:
        print("  quantized file: check its accuracy on real data")
        return 0
    rng = np.random.default_rng(args.seed)
    inputs = [
        rng.normal(size=(args.verify_samples,) + tuple(t.shape)[1:]).astype("float32")
        for t in model.inputs
    ]
    try:
        check = export.verify_tflite(
            result.path, model, inputs[0] if len(inputs) == 1 else inputs, rtol=tolerance
        )
    except ValueError as e:
        raise SystemExit(f"tfconv export: verification failed: {e}") from None
    print(
        f"  verify ({check.samples} random inputs): max abs diff {check.max_abs_diff:.3g}, "
        f"relative to output scale {check.max_rel_diff:.3g} (<= {tolerance:g}): ok"
    )
    return 0


COMMANDS = {"cost": _cost, "analyze": _analyze, "export": _export}


def run(args):
    """Runs the command `args` (parsed by `tfconv.build_parser`) names; returns its exit status.

    A `UsageError` is printed as one line, `tfconv COMMAND: error: ...`, and raised.
    """
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"tfconv {args.command}: error: {error}", file=sys.stderr)
        raise


def main(argv=None):
    """`tfconv` in this process, TensorFlow already imported: parses `argv` and runs.

    The `tfconv` command itself is `tfconv.main`, which parses before
    importing this module (and so TensorFlow) and leaves out TensorFlow's
    start-up log lines.
    """
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
