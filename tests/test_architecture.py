"""Data flows one way: each package imports only the packages its __init__ docstring allows."""
import ast

import pytest

from tests.fixtures import REPO

ALLOWED = {
    "common": set(),
    "preprocessing": {"common"},
    "dali_pipes": {"common"},
    "model": {"common"},
    "training": {"common", "dali_pipes", "model"},
    "inference": {"common", "dali_pipes", "model"},
    "demo": {"common"},
    "benchmarks": {"common", "preprocessing", "dali_pipes", "model", "training", "inference", "demo"},
}


def project_imports(package: str) -> dict[str, set[str]]:
    """module path -> the project's packages it imports (other than its own)."""
    out = {}
    for path in (REPO / package).glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found |= {n.split(".")[0] for n in names} & set(ALLOWED)
        out[f"{package}/{path.name}"] = found - {package}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_data_flow_allows(package):
    for module, imported in project_imports(package).items():
        assert imported <= ALLOWED[package], f"{module} imports {sorted(imported - ALLOWED[package])}"
    assert "May import" in (REPO / package / "__init__.py").read_text()


def test_no_module_name_is_used_twice_and_nothing_edits_sys_path():
    modules = [p for folder in ALLOWED for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"]
    names = [p.name for p in modules]
    assert sorted({n for n in names if names.count(n) > 1}) == []
    assert not [p.name for p in REPO.glob("*.py")]  # no top-level module outside a package
    edits = [str(p.relative_to(REPO)) for p in [*modules, *(REPO / "scripts").glob("*.py"), *(REPO / "tests").glob("*.py")]
             if "sys.path." in p.read_text() and p.name not in ("conftest.py", "test_architecture.py")]
    assert edits == []


def test_dali_pipes_never_runs_a_model():
    for path in (REPO / "dali_pipes").glob("*.py"):
        tree = ast.parse(path.read_text())
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                  for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert not called & {"autocast", "create_model", "model"}, path.name
        assert "timm" not in {n.split(".")[0] for n in project_names(tree)}, path.name


def project_names(tree) -> set[str]:
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
