"""The `tfconv` command.

    tfconv cost MODEL.keras [--json OUT.json]
    tfconv analyze MODEL.keras [--out-dir DIR] [--sparsities 0.25 0.5 0.75]
    tfconv export MODEL.keras OUT.tflite [--quantization dynamic|float16|int8]
                  [--representative SAMPLES.npy] [--batch-size 1]
                  [--lowering auto|grouped|slices|dense]

`cost` prints a model's parameters and multiply-adds per layer (see
`tf_transform_conv.cost`); `analyze` reports, per Conv2D layer, how well
its filters are reconstructed by each transform at a few sparsities, against
random filters of the same shape, and writes `analysis.json` and
`analysis.png` (see `tf_transform_conv.analyze`); `export` writes a `.tflite`
file whose `TransformConv2D`s are written in a compact form (only the bases
are stored; see `export.lowering_choice`), prints
its size against the parameter bytes and, for float32 and float16 files,
checks it against the Keras model on random inputs (see
`tf_transform_conv.export`).
"""

import argparse
import collections
import json
import os
import sys


def _load(path, command):
    import keras

    import tf_transform_conv  # noqa: F401  (registers the package's layers)

    if not os.path.isfile(path):
        raise SystemExit(f"tfconv {command}: no such file: {path}")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def _cost(args):
    from tf_transform_conv.cost import model_cost

    cost = model_cost(_load(args.model, "cost"))
    cost.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cost.to_dict(), f, indent=2)
    return 0


def _analyze(args):
    from tf_transform_conv import analyze

    model = _load(args.model, "analyze")
    rows = analyze.analyze_model(model, sparsities=args.sparsities, seed=args.seed)
    if not rows:
        raise SystemExit(
            "tfconv analyze: the model has no Conv2D layer with groups=1 and a "
            "kernel larger than 1x1 to analyse."
        )
    print(analyze.format_rows(rows))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "analysis.json"), "w") as f:
        json.dump({"model": args.model, "rows": [r.to_dict() for r in rows]}, f, indent=2)
    analyze.plot_rows(rows, os.path.join(args.out_dir, "analysis.png"))
    print(f"wrote {args.out_dir}/analysis.json and analysis.png")
    return 0


def _export(args):
    import numpy as np

    from tf_transform_conv import export

    model = _load(args.model, "export")
    quantization = None if args.quantization == "float32" else args.quantization
    representative = None
    if args.representative:
        if not os.path.isfile(args.representative):
            raise SystemExit(f"tfconv export: no such file: {args.representative}")
        representative = np.load(args.representative)
    try:
        result = export.export_tflite(
            model, args.output, quantization=quantization,
            representative_data=representative, batch_size=args.batch_size,
            lowering=args.lowering,
        )
    except ValueError as e:
        raise SystemExit(f"tfconv export: {e}") from None
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


def _sparsity(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tfconv", description="Tools for compact CNNs built with TransformConv2D."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser(
        "cost", help="parameters and multiply-adds of a .keras model, per layer"
    )
    cost.add_argument("model", help="path to a .keras file")
    cost.add_argument("--json", help="also write the figures as JSON to this path")
    cost.set_defaults(run=_cost)
    analyze = commands.add_parser(
        "analyze", help="how well each Conv2D's filters are rebuilt by each transform"
    )
    analyze.add_argument("model", help="path to a .keras file")
    analyze.add_argument("--out-dir", default=".", help="where analysis.json/.png go (.)")
    analyze.add_argument(
        "--sparsities", type=_sparsity, nargs="+", default=[0.25, 0.5, 0.75],
        help="fractions of filters to reconstruct (0.25 0.5 0.75)",
    )
    analyze.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    analyze.set_defaults(run=_analyze)
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
    export.add_argument("--batch-size", type=int, default=1, help="the file's batch (1)")
    export.add_argument(
        "--lowering", choices=["auto", "grouped", "slices", "dense"], default="auto",
        help="how TransformConv2D layers are written: grouped convolutions, "
        "slices and additions, or the dense kernel (auto: per layer, the fastest "
        "compact form, dense only for few-channel stems)",
    )
    export.add_argument(
        "--verify-samples", type=int, default=8,
        help="random inputs for the float check (8)",
    )
    export.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    export.set_defaults(run=_export)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
