"""The import graph's layering (architecture.md): each layer imports only the layers below it, and no
module imports, even inside a function, a module that imports it back (no circles).

The pure-torch core (models, diffusion, adapters) is checked twice: statically, every import statement in
the core's files (function-level ones included), and at run time, what importing the core pulls into a
fresh interpreter. And the tests' own layering: no test module imports another (shared helpers are in
tests/support/ and tests/conftest.py).
"""

import ast
import subprocess
import sys
from pathlib import Path

import diffscaler

CORE = ("models", "diffusion", "adapters")
# diffscaler modules the core may import: itself and the leaf config dataclasses
ALLOWED_INTERNAL = tuple(f"diffscaler.{p}" for p in CORE) + ("diffscaler.config",)
FORBIDDEN_THIRD_PARTY = ("argparse", "PIL", "ray", "deepspeed", "webdataset", "torch_fidelity", "safetensors")
ROOT = Path(diffscaler.__file__).parent
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# architecture.md's layers, bottom first. A module belongs to the layer of its longest listed prefix
# ("diffscaler" itself matches only exactly: a new module of the library must be placed here).
LAYERS = {
    "ground": (
        "diffscaler",
        "diffscaler.config",
        "diffscaler.errors",
        "diffscaler.atomic",
        "diffscaler.runlock",
        "diffscaler.cluster",
        "diffscaler.interrupts",
        "diffscaler.images",
        "diffscaler.torchvision_compat",
    ),
    "core": ("diffscaler.models", "diffscaler.diffusion", "diffscaler.adapters"),
    "libraries": (
        "diffscaler.data",
        "diffscaler.train",
        "diffscaler.eval",
        "diffscaler.report",
        "diffscaler.artifacts",
        "diffscaler.bank_file",
        "diffscaler.vae",
        "diffscaler.serving",
        "diffscaler.seed_spread",
        "diffscaler.shares",
        "diffscaler.unet",
        "diffscaler.backbones",
    ),
    "stages": ("diffscaler.stages",),
    "pipeline": ("diffscaler.pipeline",),
    "programs": (
        "diffscaler.cli",
        "diffscaler.cli_model",
        "diffscaler.data.cli",
        "diffscaler.serving.cli",
        "ray_jobs",
        "tune",
        "bench",
    ),
}
LEVEL = {name: i for i, name in enumerate(LAYERS)}
PACKAGES = ("diffscaler", "ray_jobs", "tune", "bench")


def core_files() -> list[Path]:
    return sorted(f for p in CORE for f in (ROOT / p).rglob("*.py"))


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_core_files_import_nothing_above_the_core():
    bad = []
    for path in core_files():
        for name in imported_names(path):
            top = name.split(".")[0]
            upward = top == "diffscaler" and not (name + ".").startswith(tuple(m + "." for m in ALLOWED_INTERNAL))
            if upward or top in FORBIDDEN_THIRD_PARTY:
                bad.append(f"{path.relative_to(ROOT.parent)}: {name}")
    assert not bad, "upward imports in the core:\n" + "\n".join(bad)


def test_importing_the_core_loads_no_entrypoint_io_or_cluster_module():
    modules = [f"diffscaler.{p}" for p in CORE] + [
        f"diffscaler.{f.parent.name}.{f.stem}" for f in core_files() if f.stem != "__init__"
    ]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sorted(sys.modules)))\n"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    forbidden = ("PIL", "ray", "deepspeed", "webdataset", "torch_fidelity", "safetensors")
    bad = [
        m
        for m in loaded
        if m.split(".")[0] in forbidden
        or (m.startswith("diffscaler.") and not (m + ".").startswith(tuple(a + "." for a in ALLOWED_INTERNAL)))
    ]
    assert not bad, f"importing the core loaded {bad}"


def imports_of_test_modules(source: str, package: str, filename: str = "<test>") -> list[tuple[int, str]]:
    """(line, module) of each import statement in `source`, a file of `package`, that imports a tests.test_* module."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .test_x import y, from . import test_x
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            modules = [base if base.startswith("tests.test_") else f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if hits := [m for m in modules if m.startswith("tests.test_")]:
            found.append((node.lineno, hits[0]))
    return found


def test_no_test_module_imports_another():
    files = sorted([*TESTS.glob("test_*.py"), TESTS / "conftest.py", *(TESTS / "support").glob("*.py")])
    assert len(files) > 20
    bad = []
    for path in files:
        package = ".".join(path.relative_to(TESTS.parent).parent.parts)
        bad += [
            f"{path.relative_to(TESTS.parent)}:{line}: imports {module}"
            for line, module in imports_of_test_modules(path.read_text(), package, str(path))
        ]
    assert not bad, "test modules share helpers through tests/support/ or conftest.py fixtures:\n" + "\n".join(bad)


def test_the_test_import_check_finds_each_form():
    source = (
        "import tests.test_model\nfrom tests.test_model import perturb\nfrom tests import test_model\n"
        "from .test_model import perturb\nfrom . import test_model\nfrom tests.support import models\n"
    )
    lines = [line for line, _ in imports_of_test_modules(source, "tests")]
    assert sorted(set(lines)) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------
# Every layer: arrows point down, no circles (function-local imports included)
# ------------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(f): f for p in PACKAGES for f in sorted((REPO / p).rglob("*.py"))}


def layer_of(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "diffscaler"
            if (module == prefix or inside) and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    return best and best[0]


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """{module: {project module it imports: first line}}, from every import statement: top-level,
    function-level and `if TYPE_CHECKING:` alike (relative imports resolved)."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = edges.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    out.setdefault(target, node.lineno)
    return edges


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's __init__ importing its own
    submodules is no circle (Python runs the __init__ first either way): those arrows are left out."""
    graph = {a: [b for b in bs if not b.startswith(a + ".") and not a.startswith(b + ".")] for a, bs in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in project_modules() if layer_of(m) is None]
    assert not missing, f"place these modules in a layer of architecture.md (LAYERS here): {missing}"


def test_every_import_points_down_or_sideways():
    modules = project_modules()
    upward = []
    for name, targets in import_edges(modules).items():
        for target, line in targets.items():
            if LEVEL[layer_of(target)] > LEVEL[layer_of(name)]:
                upward.append(
                    f"{modules[name].relative_to(REPO)}:{line}: {layer_of(name)} {name} imports "
                    f"{layer_of(target)} {target}"
                )
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circles():
    found = circles(import_edges(project_modules()))
    assert not found, f"modules that import each other (function-level imports included): {found}"


def test_the_checks_find_an_upward_import_and_a_circle():
    edges = import_edges({"diffscaler.models.dit": ROOT / "models" / "dit.py"})
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert circles({"p": {"p.x": 1}, "p.x": {"p": 1}}) == []  # a package and its own submodule
    assert layer_of("diffscaler.data.cli") == "programs" and layer_of("diffscaler.data.reader") == "libraries"
    assert layer_of("diffscaler.cli_model") == "programs" and layer_of("diffscaler.config") == "ground"
    assert layer_of("diffscaler.newmodule") is None and layer_of("ray_jobs.anything") == "programs"
    assert edges == {"diffscaler.models.dit": {}}  # modules outside the given set are not project modules
