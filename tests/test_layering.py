"""The packages import one way: jobs -> export -> workflow -> data -> {transforms, networks};
the demo's data makers (``pipeline.synthetic``) sit on ``data`` and only ``jobs`` imports them.

Every ``import`` and ``from ... import`` statement of the project's source is read with
:mod:`ast`, including those inside functions, so a deferred import cannot go back up either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LAYERS = ("data", "synthetic", "workflow", "export", "jobs")
"""The subpackages of ``pipeline``."""
ALLOWED_IMPORTS = {
    "transforms": {"transforms"},
    "networks": {"networks"},
    "pipeline.data": {"transforms", "networks", "pipeline.data"},
    "pipeline.synthetic": {"transforms", "networks", "pipeline.data", "pipeline.synthetic"},
    "pipeline.workflow": {"transforms", "networks", "pipeline.data", "pipeline.workflow"},
    "pipeline.export": {"transforms", "networks", "pipeline.data", "pipeline.workflow", "pipeline.export"},
    "pipeline.jobs": {"transforms", "networks", *(f"pipeline.{name}" for name in PIPELINE_LAYERS)},
}
"""What each layer may import: ``jobs -> export -> workflow -> data``, and the demo's data makers
(``synthetic``) beside them, on top of ``data``, imported by ``jobs`` alone."""


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Absolute names of the modules that a source file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pipeline import data`
    return names


def layer_of(module: str) -> str | None:
    """The project layer of a module name (``pipeline.<sub>``, ``transforms``, ``networks``)."""
    parts = module.split(".")
    if parts[0] in ("transforms", "networks"):
        return parts[0]
    if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in PIPELINE_LAYERS:
        return f"pipeline.{parts[1]}"
    return None


def source_files() -> list[Path]:
    return sorted(
        path
        for package in ("transforms", "networks", "pipeline")
        for path in (REPO_ROOT / package).rglob("*.py")
    )


@pytest.mark.parametrize("path", source_files(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_no_module_imports_upward(path: Path) -> None:
    module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    layer = layer_of(module)
    if layer is None:  # pipeline/__init__.py and pipeline/__main__.py stand above every layer
        assert module in ("pipeline.__init__", "pipeline.__main__"), f"{path}: outside every layer"
        return
    upward = sorted(
        name
        for name in imported_modules(path)
        if (target := layer_of(name)) and target not in ALLOWED_IMPORTS[layer]
    )
    assert not upward, f"{path} ({layer}) imports upward or sideways: {', '.join(upward)}"


def test_pipeline_has_no_module_outside_its_layers() -> None:
    loose = sorted(path.name for path in (REPO_ROOT / "pipeline").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]


def test_the_rule_catches_upward_imports_deferred_and_relative(tmp_path: Path) -> None:
    module = tmp_path / "pipeline" / "data" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..export import report\n    import pipeline.jobs.cli\n")
    imported = imported_modules(module, tmp_path)
    upward = {name for name in imported if layer_of(name) not in ALLOWED_IMPORTS["pipeline.data"]}
    assert upward == {"pipeline.export", "pipeline.export.report", "pipeline.jobs.cli"}


def test_only_jobs_import_the_synthetic_data_makers() -> None:
    importers = {layer for layer, allowed in ALLOWED_IMPORTS.items() if "pipeline.synthetic" in allowed}
    assert importers == {"pipeline.synthetic", "pipeline.jobs"}
