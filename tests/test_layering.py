"""The import graph's layering: the pure-torch core (models, diffusion, adapters) imports nothing above it.

Checked twice: statically, every import statement in the core's files (function-level ones included),
and at run time, what importing the core pulls into a fresh interpreter. And the tests' own layering:
no test module imports another (shared helpers are in tests/support/ and tests/conftest.py).
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
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    forbidden = ("PIL", "ray", "deepspeed", "webdataset", "torch_fidelity", "safetensors")
    bad = [m for m in loaded if m.split(".")[0] in forbidden
           or (m.startswith("diffscaler.") and not (m + ".").startswith(tuple(a + "." for a in ALLOWED_INTERNAL)))]
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
        bad += [f"{path.relative_to(TESTS.parent)}:{line}: imports {module}"
                for line, module in imports_of_test_modules(path.read_text(), package, str(path))]  # fmt: skip
    assert not bad, "test modules share helpers through tests/support/ or conftest.py fixtures:\n" + "\n".join(bad)


def test_the_test_import_check_finds_each_form():
    source = "import tests.test_model\nfrom tests.test_model import perturb\nfrom tests import test_model\n" \
             "from .test_model import perturb\nfrom . import test_model\nfrom tests.support import models\n"
    lines = [line for line, _ in imports_of_test_modules(source, "tests")]
    assert sorted(set(lines)) == [1, 2, 3, 4, 5]
