"""The package's layers look only down, and no import cycle exists (imports inside functions included).

Read from the source with ``ast`` (nothing is imported), so a new upward import fails here however lazily it
is written. The layer picture is in docs/ARCHITECTURE.md.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "pskernels"

# Bottom to top. A module may import from a lower layer or from its own subpackage, nothing else of pskernels.
LAYERS = [
    ("_core",),
    ("rope",),
    ("_C",),  # the compiled extension (csrc/): loaded by _ext only
    ("ref", "triton", "_ext"),
    ("ops",),
    ("hf",),
    ("__init__",),  # the public facade: `import pskernels` (ops eagerly, hf on first use)
    ("distributed",),
    ("synthesis",),
    ("apps",),
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}
# Layers that must work without transformers installed or imported.
NO_TRANSFORMERS = {"_core", "rope", "ref", "triton", "_ext", "ops"}


def _module_name(path: pathlib.Path) -> str:
    parts = ["pskernels", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str):
    """(target module, line) for every import in ``name``; ``from X import y`` targets X.y when that is a module."""
    tree = ast.parse(MODULES[name].read_text())
    here = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub if sub in MODULES or sub == "pskernels._C" else mod), node.lineno


def _part(module: str) -> str:
    """The layer key of a pskernels module: its first component below the package (``__init__`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges():
    for name in MODULES:
        for target, line in _imports(name):
            yield name, target, line


def test_every_module_has_a_layer():
    unknown = sorted({_part(m) for m in MODULES} - set(RANK))
    assert not unknown, f"modules outside the layer list {LAYERS}: {unknown} (add them to LAYERS and ARCHITECTURE.md)"


def test_imports_only_look_down():
    bad = []
    for src, target, line in _edges():
        if not (target == "pskernels" or target.startswith("pskernels.")):
            continue
        a, b = _part(src), _part(target)
        if a == b and a != "__init__":
            continue
        if RANK.get(b, -1) >= RANK[a]:
            bad.append(f"{src}:{line} imports {target} ({b!r} is not below {a!r})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_low_layers_do_not_import_transformers():
    bad = [f"{src}:{line} imports {target}" for src, target, line in _edges()
           if _part(src) in NO_TRANSFORMERS and target.split(".")[0] in ("transformers", "peft")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for src, target, _ in _edges():
        if target in graph and target != src:
            graph[src].add(target)
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source, expected", [
    ("from .. import ref\n", "pskernels.ref"),
    ("from ..ops import rotate_keys\n", "pskernels.ops.rotate_keys"),
    ("def f():\n    from ..hf import patch\n", "pskernels.hf.patch"),
])
def test_the_reader_sees_relative_and_lazy_imports(source, expected, monkeypatch, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    monkeypatch.setitem(MODULES, "pskernels.ops.probe", probe)
    assert expected in [t for t, _ in _imports("pskernels.ops.probe")]
