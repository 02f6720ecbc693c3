"""The package's import graph: no circles, and imports only run down the layers (core → data → train →
generate → eval → serve → export → cli). Imports inside functions count: hiding one there is still a circle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "tinygemma"
# Lowest first. A module may import its own layer or a lower one. Decoding sits below evaluation because the
# samples report, `eval --instruct` and the judge sample stories; training writes its samples report through a
# callback, so it needs no decoding at all.
LAYERS = [
    ("core", {"config", "files", "log", "device", "sampling", "tokenizer", "fused", "model", "plots", "prompts",
              "rundir", "hf_folder"}),
    ("data", {"data"}),
    ("train", {"train"}),
    ("generate", {"decode", "generate", "quant"}),
    ("eval", {"eval"}),
    ("serve", {"serve"}),
    ("export", {"export", "gguf_export"}),
    ("cli", {"cli", "__main__"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (``from tinygemma import x`` resolved to ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("tinygemma"):
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in known:
                    found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    known = set(paths)
    # a package's __init__ is imported with each of its modules: it must stay free of imports of its own
    return {m: imports_of(p, known) - {m, "tinygemma"} for m, p in paths.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py (add it)")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of two or more modules (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert cycles(graph()) == []


def test_imports_run_down_the_layers():
    g = graph()
    wrong = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
             for m in sorted(g) if m != "tinygemma" for d in sorted(g[m]) if layer_of(d) > layer_of(m)]
    assert wrong == []


def test_no_private_names_across_modules():
    known = set(graph())
    wrong = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinygemma"):
                wrong += [f"{module_name(p)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and f"{node.module}.{a.name}" not in known]
    assert wrong == []


def test_the_check_sees_circles_and_upward_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("tinygemma.cli.train") > layer_of("tinygemma.train.trainer") > layer_of("tinygemma.model")
