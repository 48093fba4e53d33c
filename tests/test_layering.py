"""The package's shape: no import cycles (module-level or inside functions), kernels below sam3d_core, and an
`import sam3d_core` that does nothing but define names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
    known = _modules("sam3d_core") | _modules("kernels")
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
    cycle = find_cycle(import_graph("sam3d_core") | import_graph("kernels"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_never_import_sam3d_core():
    bad = {m: sorted(e for e in edges if e.startswith("sam3d_core")) for m, edges in import_graph("kernels").items()}
    bad = {m: e for m, e in bad.items() if e}
    assert not bad, f"kernels import sam3d_core: {bad}"


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
