"""The package's structure: no import cycles, the CLI on top (nothing below it
imports or spawns it), and the public names of ``vmfork.__all__``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vmfork

SRC = Path(vmfork.__file__).parent


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every vmfork module that *path* imports, at import time or inside a
    function (both run the imported module), leaving out ``if TYPE_CHECKING``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules:
                found.add(candidate)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and is_type_checking(node):
                visit(node.orelse)
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    for alias in sub.names:
                        add(alias.name)
                elif isinstance(sub, ast.ImportFrom):
                    base = sub.module or ""
                    if sub.level:
                        anchor = package.split(".")
                        anchor = anchor[:len(anchor) - (sub.level - 1)]
                        base = ".".join([*anchor, base] if base else anchor)
                    add(base)
                    for alias in sub.names:
                        add(f"{base}.{alias.name}")

    visit(ast.parse(path.read_text()).body)
    found.discard(me)
    found.discard("vmfork")  # its names load lazily, on first use
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: imports_of(p, set(files)) for m, p in files.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_imports_the_cli() -> None:
    offenders = {m: sorted(i for i in deps if i.startswith("vmfork.cli"))
                 for m, deps in graph().items()
                 if not m.startswith(("vmfork.cli", "vmfork.__main__"))}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_only_the_cli_imports_the_service() -> None:
    """The daemon is a layer beside the CLI: the library below never imports it."""
    offenders = {m: sorted(i for i in deps if i.startswith("vmfork.service"))
                 for m, deps in graph().items()
                 if not m.startswith(("vmfork.service", "vmfork.cli", "vmfork.__main__"))}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_library_module_runs_the_cli() -> None:
    runs_cli = []
    for p in SRC.rglob("*.py"):
        if module_name(p).startswith(("vmfork.cli", "vmfork.__main__")):
            continue
        text = p.read_text()
        if '"-m", "vmfork"' in text or "vmfork.cli" in text.replace(":mod:`vmfork.cli", ""):
            runs_cli.append(module_name(p))
    assert runs_cli == []


def test_every_public_name_resolves() -> None:
    assert len(vmfork.__all__) == len(set(vmfork.__all__))
    for name in vmfork.__all__:
        assert getattr(vmfork, name) is not None, name
    assert issubclass(vmfork.NotFound, vmfork.VmforkError)


def test_import_vmfork_loads_nothing_else() -> None:
    code = ("import sys, vmfork; print(sorted(m for m in sys.modules "
            "if m.startswith(('vmfork.', 'qemu', 'click', 'rich', 'psutil'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_ls_on_an_empty_home_imports_little(tmp_path: Path) -> None:
    """What keeps ``vmfork ls`` fast (the README gives its timing): no event
    loop, no QMP, no logging, no rich, no record types for an empty catalog."""
    code = ("import sys\n"
            "sys.argv = ['vmfork', 'ls', '--json']\n"
            "from vmfork.cli.main import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = ('asyncio', 'qemu', 'logging', 'rich', 'psutil', 'vmfork.records',\n"
            "         'vmfork.api', 'vmfork.vm')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)), file=sys.stderr)\n")
    env = {"VMFORK_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=True)
    assert p.stdout.strip() == "[]"
    assert p.stderr.strip() == "[]"
