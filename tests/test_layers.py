"""The layers of proxy/__init__.py hold: imports go one way, no cycles, mitmproxy only at
the top. Read from the source (every import, also inside functions and under
TYPE_CHECKING), in process: no module is imported to find out."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy import LAYERS

REPO = Path(__file__).resolve().parent.parent
# Modules outside a package that are neither the wiring nor the leaves LAYERS names.
TOP_LEVEL_ALLOWED = {"__init__", "__main__", "errors", "safe_text", "batching", "server",
                     "supervisor"}


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports (a module, or a package and the name taken from it)
    line: int
    in_function: bool
    explained: bool  # a comment on its line or the line above says why it is there


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    """Our modules: the Python ones, and the compiled ones by their type stubs."""
    return sorted([*(REPO / "proxy").rglob("*.py"), *(REPO / "proxy").rglob("*.pyi"),
                   *(REPO / "addons").glob("*.py")])


def imports(path: Path) -> Iterator[Import]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]

    def explained(line: int) -> bool:
        """A comment on the import's line or within the three lines above it."""
        return any("#" in text for text in lines[max(0, line - 4):line])

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(me, alias.name, child.lineno, in_function,
                                 explained(child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                for alias in child.names:
                    yield Import(me, f"{base}.{alias.name}", child.lineno, in_function,
                                 explained(child.lineno))
            else:
                yield from visit(child, inner)

    yield from visit(tree, False)


def layer_of(name: str) -> int | None:
    """The layer of a module of ours (longest match), or None for a third-party name."""
    best: tuple[int, int] | None = None
    for level, members in enumerate(LAYERS):
        for member in members:
            if (name == member or name.startswith(member + ".")) and (
                    best is None or len(member) > best[1]):
                best = (level, len(member))
    return None if best is None else best[0]


KNOWN = {module_name(p) for p in sources()}


def owner(target: str) -> str | None:
    """The module of ours ``target`` names (``proxy.audit.AuditLog`` → ``proxy.audit``)."""
    while target and target not in KNOWN:
        target = target.rpartition(".")[0]
    return target or None


ALL = [imp for path in sources() for imp in imports(path)]


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert missing == []


def test_no_module_of_proxy_outside_a_package_but_the_allowed() -> None:
    loose = sorted(p.stem for p in (REPO / "proxy").glob("*.py"))
    assert set(loose) <= TOP_LEVEL_ALLOWED, loose


def test_imports_go_down_or_sideways_only() -> None:
    upward = []
    for imp in ALL:
        target = owner(imp.target)
        if target is None:
            continue
        mine, theirs = layer_of(imp.module), layer_of(target)
        assert mine is not None and theirs is not None
        if theirs > mine:
            upward.append(f"{imp.module}:{imp.line} imports {target} (layer {theirs} > {mine})")
    assert upward == []


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for imp in ALL:
        target = owner(imp.target)
        if target is not None and target != imp.module:
            graph.setdefault(imp.module, set()).add(target)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert cycles == []


def test_imports_inside_functions_say_why() -> None:
    silent = [f"{i.module}:{i.line} {i.target}" for i in ALL if i.in_function and not i.explained]
    assert silent == []


def test_only_the_server_and_the_addons_import_mitmproxy() -> None:
    offenders = [f"{i.module}:{i.line}" for i in ALL
                 if i.target.split(".")[0] == "mitmproxy" and i.module.startswith("proxy")
                 and i.module != "proxy.server"]
    assert offenders == []


def test_the_addons_never_import_the_server_or_the_commands() -> None:
    offenders = [f"{i.module}:{i.line} {i.target}" for i in ALL
                 if i.module.startswith("addons") and (owner(i.target) or "").startswith(
                     ("proxy.server", "proxy.cli"))]
    assert offenders == []


def test_the_checks_above_can_fail() -> None:
    """A layer test that sees nothing passes anything: it sees the server wire mitmproxy,
    the CLI import the server, and the addons import the core."""
    assert any(i.module == "proxy.server" and i.target.startswith("mitmproxy") for i in ALL)
    assert any(i.module.startswith("proxy.cli") and owner(i.target) == "proxy.server"
               for i in ALL)
    assert layer_of("proxy.cli._main") > layer_of("proxy.server") > layer_of("addons.audit")
    assert layer_of("proxy.policy._rules") < layer_of("proxy.gateway._core")
