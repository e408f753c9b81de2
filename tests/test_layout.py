"""The shape of the code: every package ships in the wheel, and the layering holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_for_the_wheel():
    config = _setuptools()
    mapped = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    found = set()
    for top, folder in [("modlabel", ROOT / "modlabel"), *mapped.items()]:
        for init in [folder / "__init__.py", *folder.rglob("__init__.py")]:
            if init.exists() and "__pycache__" not in init.parts:
                relative = init.parent.relative_to(folder).parts
                found.add(".".join((top, *relative)))
    data_only = {name for name in config["packages"] if name not in found}
    for name in data_only:  # folders of templates and queries: data, no __init__.py
        folder = mapped.get(name, ROOT / Path(*name.split(".")))
        assert folder.is_dir() and any(folder.iterdir()), name
    assert found <= set(config["packages"]), sorted(found - set(config["packages"]))


def test_the_layers_of_pyproject_hold():
    """`lint-imports` keeps every contract of [tool.importlinter]: no room imports a room
    above it, so no circle of imports can come back."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    contracts = len(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    )
    assert f"Contracts: {contracts} kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_no_import_cycle_and_no_import_hidden_in_a_function_to_dodge_one():
    """tools/import_graph.py over modlabel, modlabel.train and modlabel.export, imports inside
    functions included: no cycle, and no function-level import that would close one if it
    were made at the top of its module."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import import_graph
    finally:
        sys.path.remove(str(ROOT / "tools"))
    known, top, inner = import_graph.graph(ROOT)
    assert {"modlabel.infer", "modlabel.train.fit", "modlabel.export.parity"} <= set(known)
    assert import_graph.cycles(top | inner) == []
    assert [(a, b) for a, b in inner if import_graph.reaches(top, b, a)] == []
    # The finder finds: a cycle made by hand is one group.
    assert import_graph.cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [
        ["a", "b", "c"]
    ]
