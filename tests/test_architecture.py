"""The package's shape (docs/architecture.md "Layers"): imports point down only, no import cycles, and the
hook-name grammar has one owner. Read from the source with `ast`, so a new module is checked too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import microscope

PACKAGE = Path(microscope.__file__).parent

# Each room of the package and its rank: a module may import from rooms of lower rank and from its
# own room. interop hands a whole Scope to other libraries, so it sits above scope; analysis reads
# activation stores, so it sits above activations.
RANKS = {
    "microscope.errors": 0, "microscope.names": 1,
    "microscope.prompts": 2, "microscope.provenance": 2, "microscope.viz": 2,
    "microscope.models": 3, "microscope.hooks": 4, "microscope.scope": 5, "microscope.interop": 6,
    "microscope.activations": 7, "microscope.analysis": 8,
    "microscope.workbench": 9, "microscope.cli": 10, "microscope.__main__": 11,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(tree: ast.AST) -> list[str]:
    """Every microscope module imported anywhere in `tree` (functions and `if TYPE_CHECKING:`
    blocks included: a type-only import is a dependency too); ``from microscope import names``
    counts as microscope.names."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "microscope":
            if node.module == "microscope":
                found.extend(f"microscope.{a.name}" if a.name != "__version__" else "microscope"
                             for a in node.names)
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.split(".")[0] == "microscope")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _sources() -> dict[str, ast.AST]:
    return {_module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def test_the_import_reader_sees_type_only_imports():
    """The control for the tests below: an import under `if TYPE_CHECKING:` counts, as does one
    inside a function body."""
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from microscope.scope import Scope\n"
                     "def f():\n    import microscope.analysis.lens\n")
    assert _imports(tree) == ["microscope.scope", "microscope.analysis.lens"]


def test_every_room_has_a_rank():
    rooms = {_room(m) for m in _sources() if m != "microscope"}
    assert rooms <= set(RANKS), f"rank the new room(s) {rooms - set(RANKS)} in RANKS"


def test_imports_point_down_only():
    upward = []
    for module, tree in _sources().items():
        if module == "microscope":
            continue
        rank = RANKS[_room(module)]
        for target in _imports(tree):
            if target == "microscope":        # only `from microscope import __version__`
                continue
            if _room(target) != _room(module) and RANKS[_room(target)] >= rank:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports pointing up or sideways:\n" + "\n".join(sorted(upward))


def test_models_and_hooks_never_import_the_layers_above():
    above = ("microscope.activations", "microscope.analysis", "microscope.workbench", "microscope.cli")
    bad = [f"{m} -> {t}" for m, tree in _sources().items() if _room(m) in ("microscope.models", "microscope.hooks")
           for t in _imports(tree) if t.startswith(above)]
    assert not bad, bad


def test_analyses_never_read_the_organisms_card():
    """A study reads a model's weights, never the organism's ground truth (docs/evidence.md)."""
    def organism_imports(tree: ast.AST) -> list[str]:
        named = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 and n.module == "microscope.models" for a in n.names]   # from microscope.models import organism
        return [t for t in _imports(tree) + named if t.startswith("microscope.models.organism")]

    bad = [f"{m} -> {t}" for m, tree in _sources().items() if _room(m) == "microscope.analysis"
           for t in organism_imports(tree)]
    assert not bad, bad


def test_there_is_no_import_cycle():
    sources = _sources()
    graph = {m: {t for t in _imports(tree) if t in sources and t != m} for m, tree in sources.items()}
    cycles = [scc for scc in _strongly_connected(graph) if len(scc) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative enough for a package of ~150 modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(scc)

    for v in graph:
        if v not in index:
            connect(v)
    return out


HOOK_NAME = re.compile(r"^blocks\.(\d+|\*|\{\w*\})\.[\w.]+$")   # a name, glob or template, alone


def _builds_hook_names(tree: ast.AST) -> bool:
    """An f-string with ``blocks.`` before a formatted value, a ``"blocks.{...}"`` template, or a
    literal hook name of a block (docstrings and messages that merely show an example are fine)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for left, right in zip(node.values, node.values[1:]):
                if (isinstance(left, ast.Constant) and str(left.value).endswith("blocks.")
                        and isinstance(right, ast.FormattedValue)):
                    return True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if HOOK_NAME.match(node.value):
                return True
    return False


def test_only_the_grammar_builds_hook_names():
    builders = sorted(m for m, tree in _sources().items() if _builds_hook_names(tree))
    assert builders == ["microscope.names"], builders


def test_the_name_check_would_catch_a_module_that_formats_names():
    """The control for the test above: a hand-written name construction is seen."""
    assert _builds_hook_names(ast.parse('x = f"blocks.{layer}.hook_resid_post"'))
    assert _builds_hook_names(ast.parse('DEFAULT = "blocks.*.hook_resid_post"'))
    assert _builds_hook_names(ast.parse('SITE = "blocks.{layer}.attn.hook_z"'))
    assert not _builds_hook_names(ast.parse('msg = "names look like blocks.3.hook_resid_post"'))
