"""The package's structure: no import cycles, the CLI, the daemon and its
client on top (nothing below them imports them or spawns the CLI; the daemon
and the client do not import each other; the client needs no QEMU part), and
the public names of ``vmfork.__all__``."""

from __future__ import annotations

import ast
import re
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


def in_layer(module: str, *layers: str) -> bool:
    """Whether *module* is one of *layers* or inside one (``vmfork.cli`` is
    not inside ``vmfork.client``)."""
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


#: The layers beside each other on top: the CLI, the daemon, its REST client.
TOP = ("vmfork.cli", "vmfork.__main__", "vmfork.service", "vmfork.client")
#: Modules below the top that use a top layer on purpose: the API benchmark
#: measures the client against the library (it starts no daemon itself).
TOP_USERS = {"vmfork.bench.api": ("vmfork.client",)}


def test_only_the_cli_imports_the_cli() -> None:
    offenders = {m: sorted(i for i in deps if in_layer(i, "vmfork.cli"))
                 for m, deps in graph().items()
                 if not in_layer(m, "vmfork.cli", "vmfork.__main__")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_library_imports_no_top_layer() -> None:
    """Nothing below the top imports the CLI, the daemon or the client; the
    daemon and the client do not import each other."""
    offenders = {}
    for m, deps in graph().items():
        if in_layer(m, *TOP):
            allowed: tuple[str, ...] = ()
            if in_layer(m, "vmfork.service", "vmfork.client"):
                mine = "vmfork.service" if in_layer(m, "vmfork.service") else "vmfork.client"
                allowed = (mine,)
            else:
                continue
        else:
            allowed = TOP_USERS.get(m, ())
        bad = sorted(i for i in deps if in_layer(i, *TOP) and not in_layer(i, *allowed))
        if bad:
            offenders[m] = bad
    assert offenders == {}


def test_the_client_uses_no_operation() -> None:
    """The client works on a machine without QEMU: it imports no operation,
    no QEMU or guest module (only values, errors and the loop thread)."""
    heavy = ("vmfork.api", "vmfork.vm", "vmfork.qemu", "vmfork.guest", "vmfork.templates",
             "vmfork.update", "vmfork.snapshots", "vmfork.launch", "vmfork.images")
    g = graph()
    reach, todo = set(), [m for m in g if in_layer(m, "vmfork.client")]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(g.get(m, ()))
    assert sorted(m for m in reach if in_layer(m, *heavy)) == []


def test_no_library_module_runs_the_cli() -> None:
    runs_cli = []
    for p in SRC.rglob("*.py"):
        if in_layer(module_name(p), "vmfork.cli", "vmfork.__main__"):
            continue
        text = p.read_text().replace(":mod:`vmfork.cli", "")
        if '"-m", "vmfork"' in text or re.search(r"vmfork\.cli\b", text):
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
