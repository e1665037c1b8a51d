"""The package's layout: subpackages by role, imports only downward, all shipped."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "iq_transform"

# bottom to top: a module may import its own layer and the ones before it
LAYERS = (
    "models",
    "spikefree",
    "export",
    "kernels",
    "evaluation",
    "baselines",
    "composition",
    "reports",
    "cli",
)
# the package root registers the modifiers: it stands with the baselines
ROOT_LAYER = LAYERS.index("baselines")


def layer_of(module: str) -> int:
    """The layer of ``iq_transform[.<subpackage>[...]]``."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT_LAYER
    return LAYERS.index(parts[1])


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every ``iq_transform`` import, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] == "iq_transform"]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_sits_in_a_role_subpackage():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    folders = {p.parent.name for p in MODULES if p.parent != PACKAGE}
    assert folders == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_from_a_higher_layer(path):
    relative = path.relative_to(PACKAGE)
    own = ROOT_LAYER if len(relative.parts) == 1 else LAYERS.index(relative.parts[0])
    upward = [
        f"line {line}: {module}"
        for line, module in imported_modules(path)
        if layer_of(module) > own
    ]
    assert upward == [], f"{relative} ({LAYERS[own]}) imports from above: {upward}"


def test_the_method_knows_nothing_of_the_bench():
    """spikefree/ imports only itself and the model mapping."""
    for path in (PACKAGE / "spikefree").glob("*.py"):
        for line, module in imported_modules(path):
            allowed = module.startswith("iq_transform.spikefree")
            allowed |= module == "iq_transform.models.arch"
            assert allowed, f"{path.name}:{line} imports {module}"


def test_every_subpackage_is_shipped():
    """A package missing from pyproject's packages is left out of the wheel."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    for init in PACKAGE.rglob("__init__.py"):
        package = ".".join(init.parent.relative_to(REPO).parts)
        assert package in packages, package
