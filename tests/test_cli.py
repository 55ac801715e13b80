import json

import keras
import pytest

from tf_transform_conv import TransformConv2D
from tf_transform_conv import cli


def test_cost_command_prints_and_writes_json(tmp_path, capsys):
    model = keras.Sequential([
        keras.Input((8, 8, 4)),
        TransformConv2D(8, 3, transforms="rotations", padding="same", implementation="materialized"),
    ])
    path = tmp_path / "m.keras"
    model.save(path)
    assert cli.main(["cost", str(path), "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "Total params" in printed
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["params"] == 3 * 3 * 4 * 2 + 8
    assert data["macs"] == 8 * 8 * 3 * 3 * 4 * 8


def test_cost_command_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["cost", str(tmp_path / "missing.keras")])


def test_analyze_command_finds_planted_redundancy(tmp_path, capsys):
    """Filters built as rotations of a few bases are rebuilt exactly; random ones are not."""
    import numpy as np

    rng = np.random.default_rng(0)
    bases = rng.normal(size=(3, 3, 4, 4))
    kernel = np.concatenate([np.rot90(bases, r, axes=(0, 1)) for r in range(4)], axis=-1)
    conv = keras.layers.Conv2D(16, 3, name="planted")
    model = keras.Sequential([keras.Input((8, 8, 4)), conv])
    conv.set_weights([kernel.astype("float32"), np.zeros(16, "float32")])
    path = tmp_path / "m.keras"
    model.save(path)
    assert cli.main(["analyze", str(path), "--out-dir", str(tmp_path), "--sparsities", "0.75"]) == 0
    assert "planted" in capsys.readouterr().out
    rows = json.loads((tmp_path / "analysis.json").read_text())["rows"]
    by_set = {r["transforms"]: r for r in rows}
    assert by_set["rotations"]["error"] < 1e-6
    assert by_set["rotations"]["random_error"] > 0.5
    assert by_set["flip_h"]["error"] > 0.1  # mirrors do not rebuild rotations
    # Learned families, fitted by least squares: a learned rotation of one
    # kept filter rebuilds every quarter turn; per-tap multipliers cannot.
    assert by_set["rotation"]["family"] == "rotation"
    assert by_set["rotation"]["error"] < 1e-6
    assert by_set["scalar"]["error"] > 0.1
    assert by_set["d4+scalar"]["error"] < 1e-6
    assert (tmp_path / "analysis.png").stat().st_size > 1000


def test_analyze_without_matplotlib_writes_the_json_and_says_how_to_plot(
        tmp_path, capsys, monkeypatch):
    """matplotlib is not a base dependency: no plot, a one-line note, exit status 0."""
    import sys

    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3, name="c")])
    model.save(tmp_path / "m.keras")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli.main(["analyze", str(tmp_path / "m.keras"), "--out-dir", str(tmp_path),
                     "--sparsities", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "analysis.json").read_text())["rows"]
    assert not (tmp_path / "analysis.png").exists()
    note = [line for line in printed.splitlines() if "matplotlib" in line]
    assert len(note) == 1
    assert "pip install matplotlib" in note[0] and "tf_transform_conv[examples]" in note[0]


def _bad_model_files(folder):
    """`(path, what the message must say)` for files that are not Keras models."""
    text_keras = folder / "x.keras"
    text_keras.write_text("not a model\n")
    text_h5 = folder / "x.h5"
    text_h5.write_text("not a model either\n")
    no_config = folder / "empty.keras"
    import zipfile

    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("model.weights.h5", b"")
    other = folder / "model.txt"
    other.write_text("x")
    return [
        (text_keras, "not a valid .keras file: it is not a zip archive"),
        (text_h5, "not a valid Keras .h5 file: it is not an HDF5 file"),
        (no_config, "not a valid .keras file: the archive holds no config.json"),
        (other, "not a Keras model file: expected a .keras archive"),
        (folder / "missing.keras", "no such file"),
    ]


@pytest.mark.parametrize("command", ["cost", "analyze", "export"])
def test_unusable_model_files_are_one_line_usage_errors(tmp_path, capsys, command):
    for path, reason in _bad_model_files(tmp_path):
        argv = [command, str(path)] + ([str(tmp_path / "m.tflite")] if command == "export" else [])
        with pytest.raises(SystemExit) as error:
            cli.main(argv)
        assert error.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"tfconv {command}: error: {path}: {reason}"), line


def test_a_model_keras_cannot_rebuild_is_a_usage_error(tmp_path, capsys):
    """A well-formed archive whose configuration Keras rejects: one line with Keras's reason."""
    import zipfile

    path = tmp_path / "odd.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "NoSuchLayer", "config": {}}))
    with pytest.raises(SystemExit) as error:
        cli.main(["cost", str(path)])
    assert error.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"tfconv cost: error: {path}: not a valid .keras file: "
                           "Keras could not load it (")


def test_analyze_of_a_model_without_a_convolution_to_analyse_is_a_usage_error(tmp_path, capsys):
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(tmp_path / "d.keras")
    with pytest.raises(SystemExit) as error:
        cli.main(["analyze", str(tmp_path / "d.keras"), "--out-dir", str(tmp_path)])
    assert error.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"tfconv analyze: error: {tmp_path / 'd.keras'}: the model has no Conv2D "
                    "layer with groups=1 and a kernel larger than 1x1 to analyse")


def test_export_int8_without_samples_names_the_flag(tmp_path, capsys):
    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3)])
    model.save(tmp_path / "m.keras")
    with pytest.raises(SystemExit) as error:
        cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "m.tflite"),
                  "--quantization", "int8"])
    assert error.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--representative SAMPLES.npy" in line and "--quantization dynamic" in line
    assert "representative_data" not in line and "quantization=" not in line
    assert not (tmp_path / "m.tflite").exists()
    with pytest.raises(SystemExit, match="--representative is used only with --quantization int8"):
        cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "m.tflite"),
                  "--representative", str(tmp_path / "s.npy")])


def test_command_exit_status_for_a_bad_file(tmp_path):
    """The installed entry point: status 2 and the one-line message, no traceback."""
    import os
    import subprocess
    import sys

    (tmp_path / "x.keras").write_text("hello\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from tf_transform_conv.cli import main; "
         "sys.exit(main())", "cost", str(tmp_path / "x.keras")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tfconv cost: error: {tmp_path / 'x.keras'}: not a valid .keras file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_representative_that_is_not_an_array_is_a_usage_error(tmp_path, capsys):
    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3)])
    model.save(tmp_path / "m.keras")
    (tmp_path / "s.npy").write_text("not an array")
    with pytest.raises(SystemExit) as error:
        cli.main(["export", str(tmp_path / "m.keras"), str(tmp_path / "m.tflite"),
                  "--quantization", "int8", "--representative", str(tmp_path / "s.npy")])
    assert error.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"tfconv export: error: {tmp_path / 's.npy'}: not a .npy array")


# ----------------------------------------------------------------------------
# The `tfconv` launcher: arguments before TensorFlow, a quiet start-up


def _tfconv_script():
    """The installed `tfconv` console script, next to this interpreter."""
    import pathlib
    import shutil
    import sys

    script = pathlib.Path(sys.executable).with_name("tfconv")
    if not script.exists():
        found = shutil.which("tfconv")
        if found is None:
            pytest.skip("no tfconv console script installed (pip install -e .)")
        script = pathlib.Path(found)
    return script


def _run_tfconv(args, env=None):
    """Runs the installed `tfconv` as a user would, TF_CPP_MIN_LOG_LEVEL unset (or `env`)."""
    import os
    import subprocess

    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([str(_tfconv_script()), *args], capture_output=True, text=True,
                          env=dict(environ, **(env or {})), timeout=300)


def test_installed_tfconv_help_does_not_import_tensorflow():
    """`tfconv --help` runs the launcher, not the package: TensorFlow is never imported."""
    proc = _run_tfconv(["--help"], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: tfconv" in proc.stdout and "cost" in proc.stdout
    imported = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported, proc.stderr[-2000:]  # the import log is there to read
    assert not [line for line in imported if "tensorflow" in line or "keras" in line]


@pytest.mark.parametrize("argv, status", [
    (["--help"], 0),
    (["cost", "--help"], 0),
    (["export", "--help"], 0),
    (["cost"], 2),
    (["export", "m.keras", "m.tflite", "--batch-size", "0"], 2),
    (["analyze", "m.keras", "--sparsities", "1.5"], 2),
    (["analyze", "m.keras", "--sparsities", "half"], 2),
    (["analyze", "m.keras", "--seed", "-1"], 2),
    (["export", "m.keras", "m.tflite", "--seed", "x"], 2),
])
def test_launcher_help_and_argument_errors_do_not_import_tensorflow(argv, status):
    import subprocess
    import sys

    code = (
        "import sys, tfconv\n"
        "try:\n"
        "    tfconv.main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    print('status', exit.code)\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported'\n"
        "assert 'tf_transform_conv' not in sys.modules, 'imported the package'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"status {status}"
    if status:
        assert "tfconv" in proc.stderr and "error:" in proc.stderr


def _noise(text):
    """TensorFlow's start-up log lines (absl format, absl's notice, CUDA) in `text`."""
    import re

    return [line for line in text.splitlines()
            if re.match(r"[IWEF]\d{4} ", line) or "absl::" in line or "cuda" in line.lower()]


def test_installed_tfconv_startup_prints_no_tensorflow_log_lines(tmp_path):
    """`tfconv cost` loads TensorFlow and a model: only the table; a bad file: one line."""
    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)]).save(tmp_path / "m.keras")
    proc = _run_tfconv(["cost", str(tmp_path / "m.keras")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Total params: 112" in proc.stdout
    assert not _noise(proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not proc.stderr.strip(), proc.stderr[-2000:]

    (tmp_path / "x.keras").write_text("hello\n")
    proc = _run_tfconv(["cost", str(tmp_path / "x.keras")])
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"tfconv cost: error: {tmp_path / 'x.keras'}: not a valid .keras file")


def test_quiet_startup_filters_only_startup_lines_and_respects_the_users_level(
        capfd, monkeypatch):
    import os

    import tfconv

    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1712345678.123456   12345 port.cc:153] oneDNN custom operations are on.\n",
        "W0000 00:00:1712345678.123456   12345 cpu_feature_guard.cc:227] This TensorFlow ...\n",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild ...\n",
        "E0000 00:00:1712345678.123456   12345 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
        "E0000 00:00:1712345678.123456   12345 cuda_dnn.cc:8310] Unable to register cuDNN "
        "factory: Attempting to register factory for plugin cuDNN when one has already "
        "been registered\n",
    ]
    kept = [
        "a real message\n",
        "E0000 00:00:1712345678.123456   12345 op_kernel.cc:1830] OP_REQUIRES failed\n",
    ]
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    import absl.logging

    verbosity = absl.logging.get_verbosity()
    try:
        with tfconv.quiet_tensorflow_startup():
            os.write(2, "".join(noise + kept).encode())
    finally:
        absl.logging.set_verbosity(verbosity)
    assert capfd.readouterr().err == "".join(kept)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's choice: everything shows
    with tfconv.quiet_tensorflow_startup():
        os.write(2, "".join(noise + kept).encode())
    assert capfd.readouterr().err == "".join(noise + kept)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_package_cli_main_still_parses_with_the_launchers_parser(capsys):
    import tfconv

    assert cli.build_parser is tfconv.build_parser
    with pytest.raises(SystemExit) as error:
        cli.main(["--help"])
    assert error.value.code == 0
    assert "usage: tfconv" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["cost", "{model}", "--json", "{tmp}/missing/c.json"],
     "--json {tmp}/missing/c.json: the folder {tmp}/missing does not exist"),
    (["cost", "{model}", "--json", "{tmp}"], "--json {tmp}: is a folder, not a file"),
    (["analyze", "{model}", "--out-dir", "{model}"], "--out-dir {model}: is a file, not a folder"),
    (["analyze", "{model}", "--out-dir", "{model}/sub"],
     "--out-dir {model}/sub: cannot be made: {model} is a file, not a folder"),
    (["export", "{model}", "{tmp}/missing/m.tflite"],
     "output {tmp}/missing/m.tflite: the folder {tmp}/missing does not exist"),
    (["export", "{model}", "{tmp}"], "output {tmp}: is a folder, not a file"),
    (["export", "{model}", "{model}"], "output {model}: expected a path ending in .tflite"),
])
def test_unusable_output_paths_are_one_line_usage_errors_before_any_work(
        tmp_path, capsys, argv, message):
    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3)])
    model.save(tmp_path / "m.keras")
    fill = dict(model=tmp_path / "m.keras", tmp=tmp_path)
    with pytest.raises(SystemExit) as error:
        cli.main([part.format(**fill) for part in argv])
    assert error.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing computed or printed before the check
    (line,) = err.splitlines()
    assert line == f"tfconv {argv[0]}: error: {message.format(**fill)}", line
