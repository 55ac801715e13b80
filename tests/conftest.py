import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hypothesis  # noqa: E402

# Layer tests build and trace Keras layers: the first example of a test pays
# for tracing, so per-example deadlines are meaningless here.
hypothesis.settings.register_profile("project", deadline=None, print_blob=True)
hypothesis.settings.load_profile("project")

import pytest  # noqa: E402

# A script that test_sparsity.py runs with tfmot's or this package's imports
# prepended: on its own (as --doctest-modules would import it) it has neither.
collect_ignore = ["tfmot_script.py"]

from jax_worker import JaxWorker  # noqa: E402


@pytest.fixture(scope="session")
def jax_backend():
    """One process on Keras's JAX backend for the session: `jax_backend.run(code, *args)`."""
    worker = JaxWorker()
    yield worker
    worker.close()
