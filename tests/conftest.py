import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hypothesis  # noqa: E402

# Layer tests build and trace Keras layers: the first example of a test pays
# for tracing, so per-example deadlines are meaningless here.
hypothesis.settings.register_profile("project", deadline=None, print_blob=True)
hypothesis.settings.load_profile("project")
