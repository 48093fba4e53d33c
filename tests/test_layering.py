"""The package's shape: no import cycles (module-level or inside functions), sam3d_kernels below sam3d_core, an
`import sam3d_core` that does nothing but define names, and no top-level name that another installed distribution
also ships."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The known module a dotted import name lands in (a name inside a module resolves to that module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: str) -> dict[str, set[str]]:
    """Edges module -> module for every import statement anywhere in a file (functions included), within the
    packages of this repository. `from pkg import sub` counts as an import of pkg.sub when sub is a module."""
    known = _modules("sam3d_core") | _modules("sam3d_kernels")
    graph: dict[str, set[str]] = {}
    for mod, path in _modules(package).items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    src = f"{base}.{node.module}" if node.module else base
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
            for t in targets:
                r = _resolve(t, known)
                if r and r != mod:
                    edges.add(r)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_function_level_imports():
    graph = import_graph("sam3d_core")
    assert graph, "no modules found"
    # cli.main imports its command modules inside functions (start-up time); the walker must see them
    assert "sam3d_core.cli.reconstruct" in graph["sam3d_core.cli.main"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph("sam3d_core") | import_graph("sam3d_kernels"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_never_import_sam3d_core():
    graph = import_graph("sam3d_kernels")
    bad = {m: sorted(e for e in edges if e.startswith("sam3d_core")) for m, edges in graph.items()}
    bad = {m: e for m, e in bad.items() if e}
    assert not bad, f"sam3d_kernels imports sam3d_core: {bad}"


def test_import_sam3d_core_has_no_side_effects(tmp_path):
    """`import sam3d_core` reads no environment variable, probes no device, prints nothing and loads no torch."""
    code = (
        "import os, sys\n"
        "reads = []\n"
        "class Env(type(os.environ)):\n"
        "    def __getitem__(self, k):\n"
        "        reads.append(k); return super().__getitem__(k)\n"
        "    def get(self, k, d=None):\n"
        "        reads.append(k); return super().get(k, d)\n"
        "os.environ.__class__ = Env\n"
        "import sam3d_core\n"
        "assert sam3d_core.__version__\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL', 'safetensors'))\n"
        "print(repr((reads, heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    reads, heavy = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert out.stdout.strip().count("\n") == 0, f"import printed: {out.stdout!r}"
    assert reads == [], f"import sam3d_core read environment variables {reads}"
    assert heavy == [], f"import sam3d_core loaded {heavy[:5]}"


def _our_packages() -> list[str]:
    """The top-level packages pyproject.toml ships (its `packages.find` include patterns, e.g. "sam3d_core*")."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    names = [p.rstrip("*") for p in patterns if "." not in p]
    assert names and all((ROOT / n / "__init__.py").is_file() for n in names), names
    return names


def test_no_installed_distribution_ships_a_top_level_name_of_ours():
    """Two distributions with one import name shadow each other: our old top-level `kernels` hid Hugging Face's
    `kernels` (which transformers >= 5.25 requires and imports whenever it is installed), so `import peft` failed
    in a fresh environment. Every distribution that claims one of our names must be this project."""
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    owners = importlib.metadata.packages_distributions()
    for name in _our_packages():
        others = {d for d in owners.get(name, []) if d.replace("_", "-").lower() != ours}
        assert not others, f"{name!r} is also shipped by {sorted(others)}: rename our package"


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line ("PySide6-Essentials>=6.7" -> "pyside6-essentials")."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_install_constraints_pin_every_dependency_the_quick_start_installs():
    """`make install` installs with constraints.txt: a dependency added to pyproject.toml without `make lock`
    would float to whatever is newest on the day of a fresh install, the way a new transformers release once
    broke `import peft`."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in cfg["dependencies"] + cfg["optional-dependencies"]["dev"]} - {"torch"}
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert "==" in line, f"constraints.txt: {line!r} is not an exact pin"
            pinned[_name(line)] = line.split("==", 1)[1].strip()
    missing = sorted(wanted - set(pinned))
    assert not missing, f"constraints.txt pins no version of {missing}: run `make lock`"
    assert "torch" not in pinned and "sam3d-kit" not in pinned  # the Makefile pins torch; the project is not a dep
    makefile = (ROOT / "Makefile").read_text()
    assert '-c constraints.txt -e ".[dev]"' in makefile and "-c constraints-blender.txt" in makefile
