"""Files that a kill never leaves half-written: write to a temporary file, then rename.

`os.replace` is atomic on POSIX and Windows: a reader finds the old file or
the new one, never a mix. The training callbacks write their metadata this
way, and `examples/train.py` its `results.json`.
"""

import json
import os
import pathlib
import secrets

__all__ = ["write_json_atomic"]


def write_json_atomic(path, payload):
    """Writes `payload` as indented JSON to `path` through a temporary file and a rename.

    The temporary file sits beside `path` (the same file system, so the
    rename is atomic) and is created as `open` creates files (mode 0o666
    less the umask), so the result has the mode of the other files a run
    writes, not the 0o600 of `tempfile`. Values JSON cannot encode are
    written as their `str`. On any error the temporary file is removed and
    `path` is left as it was.

    Args:
        path: a `pathlib.Path` or string, the file to write; its folder
            must exist.
        payload: what `json.dump` writes (dicts, lists, numbers, strings).

    Example:

    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.json"
    >>> write_json_atomic(path, {"accuracy": 0.5})
    >>> json.loads(path.read_text())
    {'accuracy': 0.5}
    """
    path = pathlib.Path(path)
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
