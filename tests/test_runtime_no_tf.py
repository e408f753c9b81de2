"""The runtime never imports TensorFlow: a scan, a report and a query run without it; a local
scan never imports Ray either."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_cli_scan_report_and_query_leave_tensorflow_unimported(tiny_archive, tiny_onnx, tmp_path):
    db = tmp_path / "labels.db"
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from modlabel.cli import app

        runner = CliRunner()
        for args in (["scan", {str(tiny_archive)!r}, "--model", {str(tiny_onnx)!r},
                      "--db", {str(db)!r}],
                     ["report", "--db", {str(db)!r}, "--out", {str(tmp_path / "report")!r}],
                     ["query", "class-counts", "--db", {str(db)!r}]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "ray"))
        print("HEAVY", heavy)
        assert not heavy, heavy
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout
