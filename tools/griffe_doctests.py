"""A Griffe extension for the API reference: docstring doctests as code blocks.

The library's docstrings write their examples as bare doctest lines after
an `Example:` line (pytest runs them with `--doctest-modules`). Markdown
would read `>>>` as nested block quotes, so before a docstring is parsed
this extension puts every doctest example (its `>>>` and `...` lines and
the expected output, up to the next blank line) in a fenced `pycon` block.
Only the rendering changes; the docstrings stay as they are.

Loaded by `mkdocs.yml` (mkdocstrings' `extensions` option); it runs under
the docs environment only (`make docs`), never in the package.
"""

import griffe

FENCE = "```"


def fence_doctests(text):
    """`text` with each run of doctest lines wrapped in a pycon fence."""
    lines = text.split("\n")
    out = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(FENCE):
            in_fence = not in_fence
        if in_fence or not (stripped == ">>>" or stripped.startswith(">>> ")):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}{FENCE}pycon")
        out.extend(block)
        out.append(f"{indent}{FENCE}")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fences the doctest examples of every docstring Griffe loads."""

    def on_instance(self, *, node, obj, agent, **kwargs):
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
