"""The runtime never needs TensorFlow. A scan, a report and a query with the toy model
(tests/toy_onnx.py, made without TensorFlow) import none of TensorFlow, Keras, tf2onnx or
Ray (a local scan never needs Ray either), on SQLite and PostgreSQL.

``make test-runtime`` runs this file and tests/test_toy_onnx.py again in ``.venv-runtime``,
a virtual environment of ``pip install -e .`` with only onnx, pytest and pgserver added,
so TensorFlow is not installed at all. It sets $MODLABEL_TEST_RUNTIME_VENV there, and the
tests marked ``runtime_venv`` check that environment: TensorFlow cannot be imported, and
the commands that need it say how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from toy_onnx import write_pngs

RUNTIME_VENV_ENV = "MODLABEL_TEST_RUNTIME_VENV"
runtime_venv = pytest.mark.skipif(
    not os.environ.get(RUNTIME_VENV_ENV),
    reason=f"checks the venv without TensorFlow: make test-runtime (sets ${RUNTIME_VENV_ENV})",
)
TRAINING_ONLY = ("tensorflow", "keras", "tf2onnx")
# README: `pip install .` gives the runtime, "no TensorFlow, no scikit-learn, no scipy".
NOT_IN_THE_RUNTIME = (*TRAINING_ONLY, "sklearn", "scipy")
IMAGES = 6


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    return request.getfixturevalue("postgres_database")("runtime")


def test_cli_scan_report_and_query_leave_tensorflow_unimported(toy_onnx, db_url, tmp_path):
    folder = tmp_path / "images"
    write_pngs(folder, IMAGES)
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from modlabel.cli import app

        runner = CliRunner()
        for args in (["scan", {str(folder)!r}, "--model", {str(toy_onnx)!r},
                      "--db", {db_url!r}],
                     ["report", "--db", {db_url!r}, "--out", {str(tmp_path / "report")!r}],
                     ["query", "class-counts", "--db", {db_url!r}, "--format", "json"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        print("COUNTS", result.output)
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in {(*TRAINING_ONLY, "ray")!r})
        print("HEAVY", heavy)
        assert not heavy, heavy
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout
    counts = json.loads(done.stdout.split("COUNTS", 1)[1].split("HEAVY", 1)[0])
    assert {row["label"] for row in counts} <= {"a", "b", "c"}
    assert sum(row["images"] for row in counts) == IMAGES
    assert (tmp_path / "report" / "report.html").is_file()


@runtime_venv
def test_this_environment_has_no_tensorflow():
    for name in NOT_IN_THE_RUNTIME:
        assert importlib.util.find_spec(name) is None, f"{name} is installed in {sys.prefix}"
    with pytest.raises(ModuleNotFoundError):
        import tensorflow  # noqa: F401


@runtime_venv
def test_train_and_export_say_how_to_install_tensorflow(tmp_path):
    folder = tmp_path / "images"
    write_pngs(folder, 2)
    for args in (
        ["train", str(folder), "--out", str(tmp_path / "run")],
        ["export", str(tmp_path), "--out", str(tmp_path / "model.onnx")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "modlabel", *args], capture_output=True, text=True, timeout=120
        )
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert "pip install 'modlabel[train]'" in output and "Traceback" not in output, output
