"""The documentation's promises that a build cannot check: every public name
is in the API reference, and the README stays the short page a newcomer reads.

`make docs` (`mkdocs build --strict`) checks that the reference's `:::`
blocks resolve and that links and anchors hold; the guides' `>>>` examples
run with the test suite (`make test` collects `docs/`).
"""

import importlib
import pathlib
import pkgutil
import re
import sys
import types

import tf_transform_conv

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"


def blocks():
    """`{identifier: options text}` of every `::: identifier` block of the API pages."""
    found = {}
    for page in sorted(API.rglob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"^:::\s+(\S+)\n((?:[ \t]+\S.*\n?)*)", text, re.MULTILINE):
            found[match.group(1)] = match.group(2)
    return found


def documented():
    """Every identifier rendered by a `::: identifier` block of the API pages."""
    return set(blocks())


def with_members():
    """The modules whose block renders their public names (not `members: false` or a list)."""
    return {name for name, options in blocks().items() if "members:" not in options}


def public_modules():
    """Every module of the package as it is on disk, but private `_` ones."""
    return sorted(
        info.name
        for info in pkgutil.walk_packages(tf_transform_conv.__path__, "tf_transform_conv.")
        if not any(part.startswith("_") for part in info.name.split(".")))


def public_names(module):
    names = getattr(module, "__all__", None)
    if names is not None:
        return set(names)
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}


def test_every_public_module_has_a_reference_page():
    modules = public_modules()
    assert "tf_transform_conv.pruning.wrapper" in modules  # the walk reaches subpackages
    missing = sorted(set(modules) - documented())
    assert not missing, f"public modules without a `::: module` block in docs/api: {missing}"


def test_reference_pages_name_only_modules_that_exist():
    known = set(public_modules()) | {"tf_transform_conv", "tfconv"}
    stale = sorted(name for name in documented()
                   if name.startswith(("tf_transform_conv.", "tfconv")) and name not in known
                   and name.rsplit(".", 1)[0] not in known)
    assert not stale, f"`:::` blocks in docs/api for modules that do not exist: {stale}"


def test_every_top_level_name_is_in_the_reference():
    """Each name is rendered on the page of the module that defines it."""
    rendered = with_members()
    missing = []
    for name in tf_transform_conv.__all__:
        if name == "__version__":
            continue
        value = getattr(tf_transform_conv, name)
        assert not isinstance(value, types.ModuleType), f"{name} is a module handle"
        module = value.__module__
        by_module = module in rendered and name in public_names(importlib.import_module(module))
        if not (by_module or f"{module}.{name}" in documented()):
            missing.append(f"{name} ({module})")
    assert not missing, f"top-level names missing from docs/api: {missing}"


def test_api_index_lists_the_top_level_names():
    text = (API / "index.md").read_text()
    listed = re.findall(r"^\| \[`(\w+)`\]\[tf_transform_conv\.(\w+)\]", text, re.MULTILINE)
    assert all(a == b for a, b in listed), listed
    names = sorted(a for a, _ in listed)
    expected = sorted(n for n in tf_transform_conv.__all__ if n != "__version__")
    assert names == expected, "docs/api/index.md's table is not tf_transform_conv.__all__"


def test_the_checks_see_a_missing_page(tmp_path, monkeypatch):
    """The module check fails when a module's page is gone, and when a block renders no members."""
    for page in API.rglob("*.md"):
        target = tmp_path / page.relative_to(API)
        target.parent.mkdir(parents=True, exist_ok=True)
        if page.relative_to(API).as_posix() != "pruning/wrapper.md":
            target.write_text(page.read_text())
    monkeypatch.setattr(sys.modules[__name__], "API", tmp_path)
    assert "tf_transform_conv.pruning.wrapper" not in documented()
    assert "tf_transform_conv.pruning.wrapper" in public_modules()
    (tmp_path / "pruning" / "wrapper.md").write_text(
        "::: tf_transform_conv.pruning.wrapper\n    options:\n      members: false\n")
    assert "tf_transform_conv.pruning.wrapper" in documented()
    assert "tf_transform_conv.pruning.wrapper" not in with_members()


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
