"""The package's shape, read from the source with `ast` (nothing is imported, so it runs while bigexp cannot):

- No import cycle among bigexp's modules. Every import counts wherever it stands: a cycle that a function-local
  import hides from Python at load time is still two modules that cannot be read, tested or moved apart.
- No function over 80 lines, no module over 500, unless its docstring says why with the phrase "Long because"
  followed by the reason (e.g. "Long because the loop reads top to bottom; ...").
- Every module is reachable from an entry point (`python -m bigexp`, the console scripts of pyproject.toml, a
  `-m bigexp.<module>` in launch/ or slurm/) through imports, or through a string naming the module (importlib
  dispatch, `python -m` children). Importing a module runs its parent packages, so they are reached with it.
  Strings count for reachability only: they run at call time or in another process, never at import.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from conftest import REPO

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
LONG_BECAUSE = re.compile(r"\blong because\b\W*\w", re.IGNORECASE)


def read_package(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    """{dotted module name: (path, tree)} for every .py file under the package directory `root`."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = (path, ast.parse(path.read_text(), filename=str(path)))
    return mods


def _known(name: str, mods) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (`a.b.c` -> `a.b` when c is a name in it)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return None


def import_edges(mods) -> dict[tuple[str, str], list[int]]:
    """{(importer, imported): [line, ...]} over every import statement, module-level or not."""
    edges: dict[tuple[str, str], list[int]] = {}
    for mod, (path, tree) in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, mods) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [_known(f"{base}.{a.name}", mods) or _known(base, mods) for a in node.names]
            for t in targets:
                if t is not None and t != mod:
                    lines = edges.setdefault((mod, t), [])
                    if node.lineno not in lines:
                        lines.append(node.lineno)
    return edges


def import_cycles(mods) -> list[str]:
    """One line per strongly connected component of more than one module, naming the import lines inside it."""
    edges = import_edges(mods)
    graph = {m: sorted(t for (s, t) in edges if s == m) for m in mods}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; recursion depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                inner = [f"{s} -> {t} (line {', '.join(map(str, ls))})" for (s, t), ls in sorted(edges.items())
                         if s in comp and t in comp]
                out.append("; ".join(inner))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return out


def _where(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def long_functions(mods) -> list[str]:
    out = []
    for mod, (path, tree) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not LONG_BECAUSE.search(ast.get_docstring(node) or ""):
                    out.append(f"{_where(path)}:{node.lineno} {node.name} ({n} lines)")
    return out


def long_modules(mods) -> list[str]:
    out = []
    for mod, (path, tree) in mods.items():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and not LONG_BECAUSE.search(ast.get_docstring(tree) or ""):
            out.append(f"{mod} ({n} lines)")
    return out


def entry_points(mods, repo: Path) -> set[str]:
    roots = {m for m in mods if m.endswith(".__main__")}
    pyproject = repo / "pyproject.toml"
    if pyproject.is_file():
        scripts = tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {})
        roots |= {_known(target.split(":")[0], mods) for target in scripts.values()}
    for d in ("launch", "slurm"):
        for f in sorted((repo / d).glob("*")) if (repo / d).is_dir() else []:
            if f.is_file():
                roots |= {_known(m, mods) for m in re.findall(r"-m\s+([\w.]+)", f.read_text(errors="replace"))}
    return roots - {None}


def unreachable(mods, repo: Path) -> list[str]:
    refs = {m: set() for m in mods}
    for (s, t) in import_edges(mods):
        refs[s].add(t)
    for mod, (_, tree) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                target = node.value.split(":")[0]
                if target in mods and target != mod:
                    refs[mod].add(target)
    seen, todo = set(), sorted(entry_points(mods, repo))
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [".".join(m.split(".")[:n]) for n in range(1, m.count(".") + 1)]
        todo.extend(t for t in [*refs[m], *parents] if t in mods and t not in seen)
    return sorted(set(mods) - seen)


# ------------------------------------------------------------------------------------------------- bigexp itself
PKG = read_package(REPO / "bigexp")


def test_no_import_cycle():
    cycles = import_cycles(PKG)
    assert not cycles, "import cycles (function-local imports included):\n" + "\n".join(cycles)


def test_no_function_over_80_lines_without_a_reason():
    found = long_functions(PKG)
    assert not found, f'over {MAX_FUNCTION_LINES} lines, no "Long because" in the docstring:\n' + "\n".join(found)


def test_no_module_over_500_lines_without_a_reason():
    found = long_modules(PKG)
    assert not found, f'over {MAX_MODULE_LINES} lines, no "Long because" in the docstring:\n' + "\n".join(found)


def test_no_module_is_shadowed_by_a_package():
    # Python imports the package x/ and never x.py beside it: the file is dead, and read_package would see one only
    clash = sorted(str(p.relative_to(REPO)) for p in (REPO / "bigexp").rglob("*.py")
                   if (p.with_suffix("") / "__init__.py").is_file())
    assert not clash, "modules hidden by a package of the same name: " + ", ".join(clash)


def test_every_module_is_reachable_from_an_entry_point():
    assert entry_points(PKG, REPO) >= {"bigexp.__main__", "bigexp.cli"}
    dead = unreachable(PKG, REPO)
    assert not dead, "modules no entry point reaches (imported by nothing, or only by each other):\n" + \
        "\n".join(dead)


# ------------------------------------------------------------------------------------------------- the checker
def _package(tmp_path: Path, files: dict[str, str]):
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    return read_package(tmp_path / "pkg")


def test_checker_sees_a_cycle_hidden_by_a_local_import_and_resolves_relative_imports(tmp_path):
    mods = _package(tmp_path, {"__init__.py": "", "a.py": "from pkg.b import f\n",
                               "b.py": "def f():\n    from . import a\n", "c.py": "from .a import f\n"})
    assert import_cycles(mods) == ["pkg.a -> pkg.b (line 1); pkg.b -> pkg.a (line 2)"]
    assert ("pkg.c", "pkg.a") in import_edges(mods)


def test_checker_exempts_long_code_only_with_a_reason(tmp_path):
    body = "    x = 1\n" * MAX_FUNCTION_LINES
    mods = _package(tmp_path, {"__init__.py": "",
                               "long.py": f"def bare():\n{body}\ndef why():\n    'Long because: one sequence.'\n{body}"})
    found = long_functions(mods)
    assert len(found) == 1 and f" bare ({MAX_FUNCTION_LINES + 1} lines)" in found[0], found
    filler = "x = 1\n" * (MAX_MODULE_LINES + 1)
    mods = _package(tmp_path, {"big.py": filler, "ok.py": '"""Long because it is a table."""\n' + filler})
    assert long_modules(mods) == [f"pkg.big ({MAX_MODULE_LINES + 1} lines)"]


def test_checker_reaches_through_strings_and_parents_and_finds_orphans(tmp_path):
    mods = _package(tmp_path, {"__init__.py": "", "__main__.py": "import pkg.cli\n",
                               "cli.py": "CMDS = {'x': 'pkg.sub.x'}\n", "sub/__init__.py": "from . import helper\n",
                               "sub/x.py": "", "sub/helper.py": "", "orphan.py": "import pkg.lonely\n",
                               "lonely.py": ""})
    assert unreachable(mods, tmp_path) == ["pkg.lonely", "pkg.orphan"]
