"""The package's import graph: no cycle, no import hidden in a function, a small public face.

Read from the source with `ast` (no import runs), so a failure names the
modules and lines at fault.
"""

import ast
import pathlib

import pytest

PACKAGE = "tf_transform_conv"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Dependencies a function may import where it needs them: optional ones (not
# installed with the package, or not importable everywhere the package runs),
# and the backend libraries, of which only the active one is present (JAX's
# machines have no TensorFlow).
OPTIONAL = {
    "tensorflow_model_optimization",  # importing it switches tf.keras to legacy Keras
    "matplotlib",
    "ai_edge_litert",
    "h5py",
    "tensorflow_datasets",
    "sklearn",
    "tensorflow",
    "jax",
}


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _targets(node, module, modules):
    """The package modules an import statement depends on.

    Importing `a.b.c` runs the subpackage `a.b` first, so it counts, unless
    the importing module lives in `a.b` itself (a package's `__init__` that
    re-exports its own modules is not their dependency); the root package's
    `__init__` (the public face, which imports everything) counts only when
    a module imports a name from it.
    """
    found = set()
    own = module.split(".")
    ancestors = {".".join(own[:i]) for i in range(1, len(own))}

    def add(name):
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # subpackages and the module, not the root
            prefix = ".".join(parts[:i])
            if prefix in modules and (prefix == name or prefix not in ancestors):
                found.add(prefix)

    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE:
                found.add(PACKAGE)
            elif alias.name.startswith(PACKAGE + "."):
                add(alias.name)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved against the importing package
            package = module.split(".")
            if modules[module].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        if base == PACKAGE or base.startswith(PACKAGE + "."):
            for alias in node.names:
                name = f"{base}.{alias.name}"
                if name in modules:  # a module
                    add(name)
                else:  # a name defined or re-exported by `base` itself
                    add(base)
                    found.add(base)
    found.discard(module)
    return found


def _graph():
    modules = _modules()
    edges = {name: set() for name in modules}
    inner = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # inside functions too: hiding an import there is no way out
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name] |= _targets(node, name, modules)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    roots = [(node.module or ".").split(".")[0] if not node.level else "."]
                else:
                    continue
                for root in roots:
                    if root not in OPTIONAL:
                        inner.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} "
                                      f"({function.name}) imports {root}")
    return edges, inner


def _cycle(edges):
    """One import cycle among the modules, as a list of names, or None."""
    state = {}
    stack = []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(edges):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def test_no_import_cycle_among_modules():
    edges, _ = _graph()
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_no_import_cycle_among_subpackages():
    """Folded to subpackages (`ops`, `pruning`, ...) the graph is still acyclic: the tree is layered."""
    edges, _ = _graph()

    def unit(name):
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else name

    folded = {}
    for name, targets in edges.items():
        if name == PACKAGE:  # the top-level __init__ re-exports from everything
            continue
        source = unit(name)
        folded.setdefault(source, set())
        folded[source] |= {unit(t) for t in targets if unit(t) != source and t != PACKAGE}
    for targets in folded.values():
        for target in targets:
            folded.setdefault(target, set())
    cycle = _cycle(folded)
    assert cycle is None, f"subpackage cycle: {' -> '.join(cycle)}"


def test_no_import_inside_functions_but_optional_dependencies():
    _, inner = _graph()
    assert inner == [], "imports inside functions:\n" + "\n".join(inner)


def test_the_checker_sees_a_cycle_and_a_hidden_import():
    """The checks above would fail on a cycle and on an import inside a function."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    import os\n")
    function = tree.body[0]
    assert any(isinstance(node, ast.Import) for node in ast.walk(function))


def test_library_never_imports_examples_benchmarks_or_tfmot_at_import_time():
    edges, _ = _graph()
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root not in ("examples", "benchmarks",
                                    "tensorflow_model_optimization"), (name, root)


def test_public_face_is_small_sorted_and_complete():
    import tf_transform_conv

    names = tf_transform_conv.__all__
    assert names == sorted(names)
    assert len(names) <= 30
    for name in names:
        value = getattr(tf_transform_conv, name)
        assert not isinstance(value, type(tf_transform_conv)), f"{name} is a module handle"


@pytest.mark.parametrize("subpackage", [
    "ops", "layers", "graph", "cost", "pruning", "structured", "export",
])
def test_subpackage_exports_resolve(subpackage):
    import importlib

    module = importlib.import_module(f"{PACKAGE}.{subpackage}")
    for name in module.__all__:
        assert hasattr(module, name), f"{subpackage}.{name}"
