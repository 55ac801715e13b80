"""The documentation's promises that a build cannot check: every public name
is in the API reference, and the README stays the short page a newcomer reads.

`make docs` (`mkdocs build --strict`) checks that the reference's `:::`
blocks resolve and that links and anchors hold; the guides' `>>>` examples
run with the test suite (`make test` collects `docs/`).
"""

import pathlib
import pkgutil
import re
import types

import tf_transform_conv

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"


def documented():
    """Every identifier rendered by a `::: identifier` block of the API pages."""
    found = set()
    for page in API.rglob("*.md"):
        found.update(re.findall(r"^:::\s+(\S+)", page.read_text(), re.MULTILINE))
    return found


def public_names(module):
    names = getattr(module, "__all__", None)
    if names is not None:
        return set(names)
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}


def test_every_public_module_has_a_reference_page():
    modules = [info.name for info in pkgutil.walk_packages(tf_transform_conv.__path__,
                                                           "tf_transform_conv.")
               if not any(part.startswith("_") for part in info.name.split("."))]
    missing = sorted(set(modules) - documented())
    assert not missing, f"public modules without a `::: module` block in docs/api: {missing}"


def test_every_top_level_name_is_in_the_reference():
    rendered = documented()
    missing = []
    for name in tf_transform_conv.__all__:
        if name == "__version__":
            continue
        value = getattr(tf_transform_conv, name)
        if isinstance(value, types.ModuleType):
            if value.__name__ not in rendered:
                missing.append(name)
            continue
        module = value.__module__
        by_module = module in rendered and name in public_names(
            __import__(module, fromlist=["_"]))
        if not (by_module or f"{module}.{name}" in rendered
                or f"tf_transform_conv.{name}" in rendered):
            missing.append(name)
    assert not missing, f"top-level names missing from docs/api: {missing}"


def test_readme_is_the_short_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move the rest to docs/"
    head = "\n".join(lines[:40])
    for command in ("make demo", "make test", "make docs"):
        assert command in head, f"{command!r} is not in the README's first 40 lines"


def test_readme_links_point_at_files():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert targets and not missing, f"README.md links to missing files: {missing}"
