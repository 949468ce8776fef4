"""The house's rules, read from the source with ``ast``: layers point down only, no import
cycle inside ``mash/``, the serial side never reaches the cloud or the queue, the clients
never touch the ORM or the tasks, nothing imports the CLI, and no function-level import of
the project's own modules (the only lazy imports are the optional firebase-admin and apprise)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mash"

# Bottom to top. A module may import from its own layer or any layer below.
LAYERS = [
    ("foundation", ["mash", "mash.contract", "mash.config", "mash.clock", "mash.ids", "mash.logs", "mash.wakeup",
                    "mash.rules", "mash.sdnotify", "mash.releases", "mash.health"]),
    ("store", ["mash.models", "mash.models.*"]),
    ("logic", ["mash.protocol", "mash.alerts", "mash.commands", "mash.control", "mash.chamber",
                "mash.pacing"]),
    ("clients", ["mash.sinks", "mash.sinks.*"]),
    ("services", ["mash.simulator", "mash.board", "mash.housekeeping", "mash.reader",
                  "mash.climate", "mash.timekeeper", "mash.export",
                  "mash.devserver", "mash.devserver.*", "mash.tasks", "mash.tasks.*",
                  "mash.dashboard", "mash.dashboard.*"]),
    # the guide's Python names (CONTRACT §6), a facade over the clients and the sync manager
    ("entry points", ["mash.cloud", "mash.cloud.*", "mash.cli", "mash.__main__", "mash.worker", "mash.supervisor",
                      "mash.service", "mash.doctor", "mash.update", "mash.backup"]),
]
SERIAL_SIDE = ["mash.reader", "mash.board", "mash.housekeeping", "mash.climate", "mash.simulator",
               "mash.timekeeper",
               "mash.protocol", "mash.control", "mash.chamber"]
CLIENTS = ["mash.sinks.backend_api", "mash.sinks.mqtt_client", "mash.sinks.firebase",
           "mash.sinks.notify"]
OPTIONAL = {"firebase_admin", "apprise"}      # optional extras: imported lazily, guarded


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in package.rglob("*.py")}


def matches(name: str, patterns) -> bool:
    return any(name == p or (p.endswith(".*") and name.startswith(p[:-1])) for p in patterns)


def layer_of(name: str) -> int:
    found = [i for i, (_, patterns) in enumerate(LAYERS) if matches(name, patterns)]
    assert found, f"{name} is in no layer: add it to LAYERS"
    return max(found)


def imports(path: Path, known: set[str], package: Path = PACKAGE):
    """(imported mash module, line, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = set(map(id, tree.body))
    this = module_name(path, package)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top_level


def graph(package: Path = PACKAGE):
    known = set(modules(package))
    edges = {}
    for name, path in modules(package).items():
        edges[name] = [(target, line, top) for target, line, top in imports(path, known, package)]
    return known, edges


def upward_imports(package: Path = PACKAGE) -> list[str]:
    known, edges = graph(package)
    upward = []
    for source, targets in edges.items():
        for target, line, _ in targets:
            if target in known and target != source and layer_of(target) > layer_of(source):
                upward.append(f"{source}:{line} imports {target} "
                              f"({LAYERS[layer_of(source)][0]} -> {LAYERS[layer_of(target)][0]})")
    return upward


def test_every_import_points_down_or_sideways():
    upward = upward_imports()
    assert not upward, "\n".join(upward)


def import_cycles(package: Path = PACKAGE) -> list[str]:
    known, edges = graph(package)
    deps = {s: {t for t, _, _ in ts if t in known and t != s} for s, ts in edges.items()}
    # a package's __init__ importing its own submodules is how Python packages work; the
    # submodule importing the package back is the cycle we forbid
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not _package_and_child(cycle):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle_inside_mash():
    cycles = import_cycles()
    assert not cycles, "\n".join(cycles)


def _package_and_child(cycle) -> bool:
    """``pkg -> pkg.mod -> pkg`` where pkg.mod only imports names from pkg's submodules is
    Python's own package mechanics (``from mash.models.schema import ...`` loads
    ``mash.models`` first); only a module importing its parent package *itself* counts."""
    return len(cycle) == 3 and cycle[0] == cycle[2] and cycle[1].startswith(cycle[0] + ".")


@pytest.mark.parametrize("side, forbidden", [
    (SERIAL_SIDE, ["mash.tasks", "mash.sinks", "mash.cloud"]),
    (CLIENTS, ["mash.tasks", "mash.models"]),
])
def test_forbidden_imports(side, forbidden):
    known, edges = graph()
    bad = [f"{s}:{line} imports {t}" for s in side for t, line, _ in edges.get(s, [])
           if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli():
    known, edges = graph()
    bad = [f"{s}:{line}" for s, ts in edges.items() for t, line, _ in ts
           if t == "mash.cli" and s != "mash.__main__"]
    assert not bad, "mash.cli is imported by " + ", ".join(bad)


def test_no_lazy_import_of_the_project_or_a_required_package():
    known, edges = graph()
    lazy = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        guarded = {id(n) for t in tree.body if isinstance(t, ast.Try)
                   for n in ast.walk(t) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top or id(node) in guarded:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            roots = {(a.name if isinstance(node, ast.Import) else (node.module or "")).split(".")[0]
                     for a in node.names}
            if roots - OPTIONAL:
                lazy.append(f"{name}:{node.lineno} imports {', '.join(sorted(roots))} inside a function")
    assert not lazy, "\n".join(lazy)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: run them on a small tree that breaks both rules."""
    pkg = tmp_path / "mash"
    (pkg / "models").mkdir(parents=True)
    (pkg / "tasks").mkdir()
    for f in ("__init__.py", "models/__init__.py", "tasks/__init__.py", "tasks/sync.py"):
        (pkg / f).write_text("")
    (pkg / "models" / "store.py").write_text("from mash.tasks import sync\n")      # store -> services
    (pkg / "protocol.py").write_text("import mash.alerts\n")
    (pkg / "alerts.py").write_text("from mash import protocol\n")               # a cycle
    assert upward_imports(pkg) == ["mash.models.store:1 imports mash.tasks.sync (store -> services)"]
    assert import_cycles(pkg) == ["mash.alerts -> mash.protocol -> mash.alerts"]
    assert _package_and_child(["mash.models", "mash.models.store", "mash.models"])
