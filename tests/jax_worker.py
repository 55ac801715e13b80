"""A Python process on Keras's JAX backend that runs test snippets, one after another.

Tests on the JAX backend cannot share the pytest process (Keras picks its
backend once, at import), and a process per test pays for importing JAX,
Keras, TensorFlow and the package every time. `JaxWorker` starts this file
once per test session (the `jax_backend` fixture in `conftest.py`); each
snippet runs in a fresh namespace after `keras.backend.clear_session()`,
and whatever it leaves in `result` (JSON-able) comes back, or its exception.

Protocol: one JSON line per request on stdin, `{"code": ..., "args": [...]}`
(`args` is bound to `sys.argv[1:]`-like `args`); one line per answer on
stdout, prefixed by `ANSWER`, so that what the snippet prints does not
confuse it.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback

ANSWER = "\x1eJAX-WORKER-ANSWER "


def serve():
    import keras  # noqa: F401  (the backend is chosen by KERAS_BACKEND)
    import numpy as np  # noqa: F401

    assert keras.backend.backend() == "jax", keras.backend.backend()
    import tf_transform_conv  # noqa: F401  (registers the package's layers)

    for line in sys.stdin:
        request = json.loads(line)
        keras.backend.clear_session()
        namespace = {"__name__": "__jax_snippet__", "args": request.get("args", [])}
        answer = {}
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(request["code"], "<jax snippet>", "exec"), namespace)
            answer["result"] = namespace.get("result")
        except BaseException as error:  # noqa: BLE001 - reported to the test
            answer["error"] = f"{type(error).__name__}: {error}"
            answer["traceback"] = traceback.format_exc()
        answer["printed"] = printed.getvalue()[-4000:]
        sys.stdout.write(ANSWER + json.dumps(answer, default=repr) + "\n")
        sys.stdout.flush()


class JaxWorker:
    """Runs snippets in one JAX-backend process: `run(code, *args) -> result`."""

    def __init__(self):
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                   TF_CPP_MIN_LOG_LEVEL="3")
        self.process = subprocess.Popen(
            [sys.executable, "-u", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )

    def run(self, code, *args):
        """The `result` the snippet `code` set, or an AssertionError with its traceback."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the JAX worker exited ({self.process.returncode})")
        request = json.dumps({"code": code, "args": [str(a) for a in args]})
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(ANSWER):
                answer = json.loads(line[len(ANSWER):])
                break
        else:
            raise RuntimeError(f"the JAX worker exited ({self.process.wait()})")
        if "error" in answer:
            raise AssertionError(
                f"on JAX: {answer['error']}\n{answer['traceback']}\n{answer['printed']}")
        return answer["result"]

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


if __name__ == "__main__":
    serve()
