"""The dependencies say what is used: every import is declared, every declaration is imported (or named
below with the reason), the tools CI runs are pinned, and requirements.lock pins what this venv holds."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
RUNTIME_FOLDERS = ("diffscaler", "ray_jobs", "tune", "bench")
OWN = {"diffscaler", "ray_jobs", "tune", "bench", "tests"}
# Declared but never imported by name here, and why.
INDIRECT = {
    "tensorboard": "torch.utils.tensorboard writes the event files",
    "pytest-timeout": "a pytest plugin (--timeout)",
    "ruff": "a command `make test` runs",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared() -> tuple[set[str], set[str]]:
    project = pyproject()["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    return runtime, {requirement_name(r) for r in project["optional-dependencies"]["dev"]}


def no_deps_extras() -> set[str]:
    """Installed by the Makefile with --no-deps beside the declared ones (their metadata would pull a CUDA torch)."""
    names = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        if "--no-deps" in line:
            names |= {requirement_name(w) for w in line.split("--no-deps", 1)[1].split() if "==" in w}
    return names


def imported_modules(folders) -> dict[str, str]:
    """{top-level module: first file importing it}: import statements, importlib.import_module("x") and
    importlib.util.find_spec("x") with a literal name, function-level ones included."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("import_module", "find_spec")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    names = [node.args[0].value]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in OWN and top not in sys.stdlib_module_names and top != "__future__":
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def distributions(modules: dict[str, str]) -> dict[str, str]:
    """{distribution: a file importing it} for the modules of `modules` (an unknown module maps to itself)."""
    owners = importlib.metadata.packages_distributions()
    return {normalize(d): where for module, where in modules.items() for d in owners.get(module, [module])}


def test_every_import_is_declared():
    runtime, dev = declared()
    used = distributions(imported_modules(RUNTIME_FOLDERS))
    missing = {d: where for d, where in used.items() if d not in runtime | no_deps_extras()}
    assert not missing, f"imported but not in [project].dependencies: {missing}"
    test_used = distributions(imported_modules(["tests"]))
    missing = {d: where for d, where in test_used.items() if d not in runtime | dev | no_deps_extras()}
    assert not missing, f"imported by tests but not declared (dev extra): {missing}"


def test_every_declared_dependency_is_imported_or_explained():
    runtime, dev = declared()
    used = set(distributions(imported_modules(RUNTIME_FOLDERS)))
    test_used = set(distributions(imported_modules(["tests"])))
    unused = runtime - used - set(INDIRECT)
    assert not sorted(unused & test_used), f"used only by tests, so a dev extra: {sorted(unused & test_used)}"
    assert not sorted(unused), f"declared in [project].dependencies but imported nowhere: {sorted(unused)}"
    assert not sorted(dev - test_used - set(INDIRECT)), f"dev extras nothing uses: {sorted(dev - test_used)}"


def test_the_tools_ci_runs_are_pinned():
    dev = pyproject()["project"]["optional-dependencies"]["dev"]
    for tool in ("pytest", "pytest-timeout", "ruff"):
        spec = next(r for r in dev if requirement_name(r) == tool)
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.+]*", spec), f"{tool} is not pinned: {spec}"


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if m := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip()):
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def test_the_lock_holds_every_declared_package_at_the_installed_version():
    pins = locked()
    runtime, dev = declared()
    assert not sorted((runtime | dev) - set(pins)), "pyproject.toml changed without `make lock`"
    drift = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"(locked, installed) differ: {drift}; `make setup` installs the lock"
