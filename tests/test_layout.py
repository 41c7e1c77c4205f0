"""The folders show the architecture: each wing imports only the wings below it, and no module
imports itself back through others (module-level imports and the lazy ones inside functions
alike). docs/layout.md draws the same picture."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "abexp"
TOP = {"config", "io", "seeds", "tv_compat", "process_env", "registry", "plugins", "__init__"}
# a wing -> the wings it may import (besides itself and the top-level modules)
ALLOWED = {"sim": set(), "data": set(), "train": {"sim", "data"}, "lab": {"sim", "data", "train"},
           "tools": {"sim", "data", "train", "lab"}, "figures": {"sim", "lab"}, "top": set(),
           "cli": {"sim", "data", "train", "lab", "tools", "figures"}}
# the package root's public Python API, each imported lazily on first use (abexp/__init__.py)
PUBLIC_API = {"abexp.train.torch_optim", "abexp.data.common", "abexp.lab.backends"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in TOP):
        return "top"
    return parts[1] if parts[1] != "cli" else "cli"


def imports(path: Path) -> set[str]:
    """abexp modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("abexp")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("abexp"):
            for alias in node.names:  # `from abexp.data import images` names a module
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_wing_imports_only_the_wings_below_it():
    bad = []
    for module, targets in graph().items():
        for target in targets:
            if module == "abexp" and target in PUBLIC_API:
                continue
            src, dst = wing(module), wing(target)
            if dst not in ("top", src) and dst not in ALLOWED[src]:
                bad.append(f"{module} -> {target}")
            if src == "top" and dst != "top":
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_no_module_imports_itself_back():
    edges = {m: {t for t in ts if t != m} for m, ts in graph().items()}
    cycles = []

    def visit(node, path):
        for nxt in edges.get(node, ()):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in path and len(path) < 12:
                visit(nxt, path + [nxt])

    for start in edges:
        visit(start, [start])
    assert not cycles, cycles[:5]


def test_each_wing_says_what_it_is_and_what_it_may_import():
    for name in ALLOWED:
        init = PACKAGE / name / "__init__.py"
        if name in ("top", "cli"):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), init
