"""The layers of DESIGN.md section 2, read from the source: every module's imports (those inside functions and
``if TYPE_CHECKING`` blocks included) point to its own layer or below, no modules import each other in a ring, and
every registry entry names something that exists in a layer its registry may use. Pure ``ast``: nothing imported.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the installed package names live in the repository (setup.py's package_dir).
PACKAGE_DIRS = {"cpcluster": "cpcluster", "cpcluster.jobs": "jobs", "cpcluster.sharding": "sharding",
                "cpcluster.aggregate": "aggregate"}
# The one table of layers: module prefix -> layer (the longest prefix wins). Imports go to the same or a lower layer.
LAYERS = {
    "cpcluster.cli": 5, "cpcluster.__main__": 5,
    "cpcluster.orchestrate": 4,
    "cpcluster.jobs": 3,
    "cpcluster.core": 2, "cpcluster.models": 2, "cpcluster.convert": 2, "cpcluster.demo": 2,
    "cpcluster.sharding": 2, "cpcluster.aggregate": 2,
    "cpcluster.util": 1, "cpcluster": 1,  # the package itself holds only __version__
}
# Registries that name their plug-ins as strings ("module" or "module:attribute"), imported on demand.
REGISTRIES = {"cpcluster.cli": ("COMMANDS",), "cpcluster.models.specs": ("DENOISERS", "CLASSIFIERS", "DATASETS"),
              "cpcluster.models.purifiers": ("PURIFIERS",), "cpcluster.models.archs": ("ARCHITECTURES",),
              "cpcluster.convert": ("CONVERTERS",)}
NO_TORCH = ("cpcluster.aggregate", "cpcluster.sharding")  # numpy-only packages


def _modules() -> dict:
    """``{module name: parsed tree}`` of every module of the installed packages."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, top)
            parts = [] if rel == "." else rel.split(os.sep)
            if package == "cpcluster" and parts and ".".join(["cpcluster", *parts]) in PACKAGE_DIRS:
                continue
            for name in filenames:
                if name.endswith(".py"):
                    dotted = ".".join([package, *parts] + ([] if name == "__init__.py" else [name[:-3]]))
                    with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                        found[dotted] = (ast.parse(fh.read()), name == "__init__.py")
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ``MODULES`` that ``name`` (a module or a module attribute) lives in, else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set:
    tree, is_package = MODULES[module]
    base = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                source = f"{anchor}.{source}" if source else anchor
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        out |= {_owner(n) for n in names if n.split(".")[0] == "cpcluster"}
    return out - {None, module}


GRAPH = {m: _imports(m) for m in MODULES}


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_the_package_is_found():
    for module in ("cpcluster.cli", "cpcluster.orchestrate.certify", "cpcluster.jobs.certify", "cpcluster.core.shards",
                   "cpcluster.sharding.plan", "cpcluster.aggregate.stats", "cpcluster.util.fileio"):
        assert module in MODULES
    assert GRAPH["cpcluster.cli.certify_cmd"] >= {"cpcluster.orchestrate.certify"}  # imports are read
    assert GRAPH["cpcluster.jobs.certify"] >= {"cpcluster.core.engine"}  # ... also those inside functions
    assert (layer("cpcluster.cli.certify_cmd"), layer("cpcluster.jobs.certify"), layer("cpcluster")) == (5, 3, 1)


def test_every_module_sits_in_a_layer_folder():
    loose = [m for m in MODULES if m not in ("cpcluster", "cpcluster.__main__")
             and max((p for p in LAYERS if m == p or m.startswith(p + ".")), key=len) == "cpcluster"]
    assert not loose, f"modules outside the layer folders of DESIGN.md section 2: {loose}"


def test_imports_point_down():
    upward = sorted(f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in GRAPH.items() for t in targets
                    if layer(t) > layer(m))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def _rings(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, rings, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                ring = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    ring.append(member)
                    if member == node:
                        break
                if len(ring) > 1:
                    rings.append(sorted(ring))
    return rings


def test_no_import_rings():
    rings = _rings(GRAPH)
    assert not rings, "modules that import each other (directly or in a ring): " + "; ".join(map(str, rings))


def test_the_ring_finder_finds_rings():
    assert _rings({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _rings({"a": {"b"}, "b": set()}) == []


def _defines(module: str, attribute: str) -> bool:
    tree, _ = MODULES[module]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == attribute:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attribute for t in node.targets):
            return True
    return False


def _registry(module: str, name: str) -> dict:
    for node in MODULES[module][0].body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Dict):
            return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(node.value.keys, node.value.values)}
    raise AssertionError(f"{module}.{name} is not a literal dict")


@pytest.mark.parametrize("module", sorted(REGISTRIES))
def test_registry_entries_exist_and_respect_the_layers(module):
    for name in REGISTRIES[module]:
        table = _registry(module, name)
        assert table, f"{module}.{name} is empty"
        for key, entry in table.items():
            target, _, attribute = entry.partition(":")
            assert target in MODULES, f"{module}.{name}[{key!r}]: no module {target}"
            assert not attribute or _defines(target, attribute), f"{module}.{name}[{key!r}]: {entry} does not exist"
            assert layer(target) <= layer(module), f"{module}.{name}[{key!r}] names a higher layer: {target}"


def test_numpy_only_layers_never_import_torch():
    offenders = []
    for module, (tree, _) in MODULES.items():
        if module.startswith(NO_TORCH):
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{module}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not offenders, offenders


def test_setup_py_installs_every_package():
    """A non-editable ``pip install .`` gets every package folder (setup.py lists them by hand)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    listed = next(ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "packages")
    packages = {m for m, (_, is_package) in MODULES.items() if is_package}
    assert packages == set(listed), f"setup.py packages: missing {packages - set(listed)}, extra {set(listed) - packages}"
