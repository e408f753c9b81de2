"""The CLI end to end on a tiny archive: synth, scan, report, query, explain and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from modlabel import store
from modlabel.cli import app
from modlabel.errors import ExitCode

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_writes_an_archive(tmp_path):
    result = invoke("synth", tmp_path / "a", "--per-class", 2, "--size", 64, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "a").rglob("*.jpg"))) == 14
    lines = (tmp_path / "a" / "ground_truth.jsonl").read_text().splitlines()
    assert len(lines) == 14 and all(json.loads(line)["boxes"] for line in lines)


def test_scan_report_and_query(tiny_archive, tiny_onnx, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(tiny_archive, archive)
    (archive / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    db = tmp_path / "labels.db"
    result = invoke(
        "scan", archive, "--model", tiny_onnx, "--db", db, "--class-min-confidence", "0"
    )
    assert result.exit_code == 0, result.output
    assert "broken.jpg: not a recognized image format" in result.output

    result = invoke("report", "--db", db, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "broken.jpg" in html
    assert "class-level ROI" in html.lower() or "Class-level ROI" in html

    result = invoke("query", "class-counts", "--db", db, "--format", "json")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert sum(r["images"] for r in counts) == len(list(archive.rglob("*.jpg")))
    assert any(r["label"] == "(error)" and r["images"] == 1 for r in counts)

    result = invoke("query", "by-label", "--db", db)
    assert result.exit_code != 0 and "--param label=..." in result.output

    label = next(r["label"] for r in counts if r["label"] != "(error)")
    result = invoke(
        "query",
        "by-label",
        "-p",
        f"label={label}",
        "-p",
        "min_confidence=0",
        "--db",
        db,
        "--format",
        "csv",
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("path,label,confidence,runner_up")


def test_scan_with_postgresql_url(tiny_archive, tiny_onnx, postgres_url, tmp_path):
    result = invoke(
        "scan",
        tiny_archive,
        "--model",
        tiny_onnx,
        "--db",
        postgres_url,
        "--class-min-confidence",
        "0",
    )
    assert result.exit_code == 0, result.output
    result = invoke("query", "scans", "--db", postgres_url, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["seen"] >= 1
    # Every named query runs unchanged on PostgreSQL too.
    from modlabel.queries import list_queries
    from modlabel.store import open_db, pick_model

    engine = open_db(postgres_url)
    newest = pick_model(engine).identity
    with engine.connect() as conn:
        stored_path = conn.execute(store.images.select().limit(1)).first().path
    params = {
        "path": stored_path,
        "limit": "5",
        "label": "chest_xray",
        "min_confidence": "0.0",
        "threshold": "0.99",
        "model_a": newest,
        "model_b": newest[:8],  # a prefix is enough
    }
    for q in list_queries():
        # "model" is left out: it defaults to the newest model.
        args = [a for p in q.parameters if p != "model" for a in ("-p", f"{p}={params[p]}")]
        result = invoke("query", q.name, *args, "--db", postgres_url)
        assert result.exit_code == 0, (q.name, result.output)
    result = invoke("query", "class-counts", "--db", postgres_url, "--format", "json")
    assert sum(r["images"] for r in json.loads(result.output)) >= 56
    result = invoke("report", "--db", postgres_url, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "data:image/png;base64," in (tmp_path / "report" / "report.html").read_text()


def test_scan_errors_are_clean_messages(tmp_path, tiny_archive):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not onnx")
    result = invoke("scan", tiny_archive, "--model", bogus, "--db", tmp_path / "x.db")
    assert result.exit_code == ExitCode.MODEL
    assert "not a loadable ONNX model" in result.output and "Traceback" not in result.output
    result = invoke("scan", tiny_archive, "--model", tmp_path / "missing.onnx")
    assert result.exit_code == ExitCode.MODEL and "cannot read model" in result.output


def test_explain_writes_figures(tiny_archive, tiny_onnx, tmp_path):
    image = sorted(Path(tiny_archive).rglob("*.jpg"))[0]
    result = invoke("explain", image, "--model", tiny_onnx, "--out", tmp_path / "fig")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "fig").glob("*.png"))) == 1


def test_scan_reads_paths_from_a_table_of_figures(tiny_archive, tiny_onnx, tmp_path):
    import sqlalchemy as sa

    figures = sorted(Path(tiny_archive).rglob("*.jpg"))[:5]
    catalogue = tmp_path / "catalogue.db"
    engine = sa.create_engine(f"sqlite:///{catalogue}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE figures (id INTEGER PRIMARY KEY, file TEXT)"))
        rows = [{"f": str(p.relative_to(tiny_archive))} for p in figures] + [{"f": "gone.jpg"}]
        conn.execute(sa.text("INSERT INTO figures (file) VALUES (:f)"), rows)
    db = tmp_path / "labels.db"
    result = invoke(
        "scan",
        "--table",
        "figures",
        "--path-column",
        "file",
        "--table-db",
        catalogue,
        "--base-dir",
        tiny_archive,
        "--model",
        tiny_onnx,
        "--db",
        db,
    )
    assert result.exit_code == 0, result.output
    assert "gone.jpg: no such file" in result.output
    result = invoke("query", "class-counts", "--db", db, "--format", "json")
    counts = json.loads(result.output)
    assert sum(r["images"] for r in counts if r["label"] != "(error)") == 5

    result = invoke(
        "scan", "--table", "nope", "--table-db", catalogue, "--model", tiny_onnx, "--db", db
    )
    assert result.exit_code == ExitCode.NO_INPUT and "no table 'nope'" in result.output


def test_train_evaluate_and_export_through_the_cli(tiny_archive, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        tiny_archive,
        "--out",
        run,
        "--backbone",
        "tiny",
        "--input-size",
        32,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--head-filters",
        8,
    )
    assert result.exit_code == 0, result.output
    assert (run / "model.keras").exists() and (run / "metrics.json").exists()
    result = invoke("evaluate", run)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "MCC" in result.output
    result = invoke("export", run, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and (tmp_path / "m.onnx").exists()
    result = invoke("train", tiny_archive, "--out", tmp_path / "r2", "--backbone", "resnet")
    assert result.exit_code == 1 and "resnet" in result.output and "Traceback" not in result.output


def test_version():
    from modlabel import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"modlabel {__version__}"


def test_scan_on_a_terminal_shows_progress_and_a_summary(
    tiny_archive, tiny_onnx, tmp_path, monkeypatch
):
    monkeypatch.setattr("modlabel.cli.scan.interactive", lambda: True)
    result = invoke("scan", tiny_archive, "--model", tiny_onnx, "--db", tmp_path / "t.db")
    assert result.exit_code == 0, result.output
    total = len(list(Path(tiny_archive).rglob("*.jpg")))
    assert f"{total} files: {total} labeled, 0 unchanged, 0 errors" in result.output


# -- help, placeholders and usage ---------------------------------------------------------


def _every_command() -> list[list[str]]:
    from typer.main import get_command

    root = get_command(app)
    found = [[]]
    for name, command in root.commands.items():
        found.append([name])
        found += [[name, sub] for sub in getattr(command, "commands", {})]
    return found


def _help(*command: str) -> str:
    """``modlabel COMMAND -h`` as one line of words: Rich's boxes and wrapping removed."""
    result = invoke(*command, "-h")
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").replace("╭", " ").split())


def test_help_keeps_brackets_and_names_no_python_types():
    """Help is taken literally (Rich markup swallowed ``[ray]``) and a value's placeholder
    says what to type, not a Python type (``<bool>``, ``<list[Path]>``)."""
    import re

    from typer.main import get_command

    def raw_helps(command) -> list[str]:
        texts = [command.help or "", command.epilog or ""]
        texts += [getattr(p, "help", None) or "" for p in command.params]
        return texts

    root = get_command(app)
    for words in _every_command():
        command = root
        for name in words:
            command = command.commands[name]
        text = _help(*words)
        assert not re.search(r"<(bool|str|int|float|path|list|tuple)\b", text), (words, text)
        for raw in raw_helps(command):
            for bracketed in re.findall(r"\S*\[[^\]\s]+\]\S*", raw.replace("\\[", "[")):
                assert bracketed in text, (words, bracketed)
    assert "pip install 'modlabel[ray]'" in _help("scan")
    # The list of commands shows each one's first paragraph as one flowing text.
    assert all("\n" not in c.short_help for c in root.commands.values())


def test_placeholders_say_what_to_type():
    text = _help("scan")
    for shown in (
        "PATHS PATH... Files or folders",
        "--model PATH ONNX model",
        "--db URL SQLAlchemy URL",
        "--table-db URL Database of --table",
        "--batch-size N [x>=1]",
        "--decode-memory SIZE Address space",
        "--max-file-size SIZE Refuse",
        "--decode-timeout SECONDS Seconds",
        "--class-min-confidence NUMBER [0<=x<=1]",
        "--include TEXT Glob",
        "--allow-missing Mark every",  # a flag takes no value
        "--help -h Show this message",
    ):
        assert shown in text, shown
    report_help = _help("report")
    assert "--out PATH" in report_help and "--truth-from-folders Ground truth" in report_help
    assert "--db URL" in _help("db", "status")


def test_scan_help_lists_every_exit_code_with_its_meaning():
    from modlabel.cli.options import EXIT_CODE_MEANINGS

    text = _help("scan")
    for code in ExitCode:
        assert f"{int(code)} {EXIT_CODE_MEANINGS[code]}" in text, code


def test_bare_modlabel_shows_help_and_usage_errors_exit_2():
    bare = _run()
    assert bare.returncode == 0 and "COMMAND [ARGS]..." in bare.stdout, bare.stderr
    wrong = _run("scan", "--no-such-option")
    assert wrong.returncode == ExitCode.USAGE
    assert wrong.stderr.startswith("modlabel: error: No such option: --no-such-option")


def _run(*args: object):
    """The real entry point (``main``): its one-line messages, as a user sees them."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "modlabel", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_out_must_be_a_folder(tmp_path):
    """--out naming a file, or a path under one, is a usage error naming the file (it was
    "Not a directory" about a report file inside it)."""
    taken = tmp_path / "report.html"
    taken.write_text("not a folder")
    done = _run("report", "--db", tmp_path / "none.db", "--out", taken)
    assert done.returncode == ExitCode.USAGE
    assert f"--out: must be a folder; {taken} is a file" in done.stderr
    done = _run("report", "--db", tmp_path / "none.db", "--out", taken / "sub")
    assert done.returncode == ExitCode.USAGE
    assert f"must be a folder; {taken}, above {taken / 'sub'}, is a file" in done.stderr


def test_explain_walks_folders_with_a_limit_and_names_a_broken_file(toy_onnx, tmp_path):
    from toy_onnx import write_pngs

    archive = tmp_path / "archive"
    write_pngs(archive / "b", 2)
    write_pngs(archive / "a", 2)
    (archive / "a" / "notes.txt").write_text("not an image: passed over, as scan does")
    (archive / "a" / "z_broken.png").write_bytes(b"not a png")
    result = invoke(
        "explain", archive, "--model", toy_onnx, "--out", tmp_path / "fig", "--limit", "2",
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)  # walk order: a/ before b/, sorted within
    assert [r["path"] for r in shown] == [str(p) for p in sorted((archive / "a").glob("n*.png"))]
    result = invoke("explain", archive, "--model", toy_onnx, "--out", tmp_path / "all")
    assert result.exit_code == 1
    broken = [line for line in result.output.splitlines() if "broken.png" in line]
    assert broken == [f"modlabel: {archive / 'a' / 'z_broken.png'}: not a recognized image format"]
    assert len(list((tmp_path / "all").glob("*.explain.png"))) == 4
    assert "notes.txt" not in result.output


def test_export_names_the_int8_file_before_any_work(tmp_path):
    """--out is the fp32 model: ``--out m.int8.onnx --quantize int8`` (which wrote fp32
    there and int8 to m.int8.int8.onnx) is refused at once, saying what to pass."""
    run = tmp_path / "run"
    run.mkdir()
    done = _run("export", run, "--out", tmp_path / "m.int8.onnx", "--quantize", "int8")
    assert done.returncode == ExitCode.USAGE
    assert f"--out {tmp_path / 'm.onnx'} (the int8 model then goes to" in done.stderr
    done = _run("export", run, "--out", tmp_path / "m.onnx", "--int8-out", tmp_path / "q")
    assert done.returncode == ExitCode.USAGE and "needs --quantize int8" in done.stderr
    done = _run(
        "export", run, "--out", tmp_path / "m.onnx", "--quantize", "int8",
        "--int8-out", tmp_path / "m.onnx",
    )  # fmt: skip
    assert done.returncode == ExitCode.USAGE and "is --out, the fp32 model" in done.stderr
    assert list(tmp_path.iterdir()) == [run]


def test_a_scan_from_relative_paths_stores_them_absolute(toy_onnx, tmp_path, monkeypatch):
    """The model file and the roots a scan was given relative to its folder are stored as
    absolute paths, so that a later command run from another folder finds the model
    (similar embeds with it, report --truth scores with it)."""
    from toy_onnx import write_pngs

    work = tmp_path / "work"
    write_pngs(work / "images", 2)
    shutil.copy(toy_onnx, work / "toy.onnx")
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["scan", "images", "--model", "toy.onnx", "--db", "labels.db"])
    assert result.exit_code == 0, result.output
    engine = store.open_db(f"sqlite:///{work / 'labels.db'}")
    assert store.pick_model(engine).path == str(work / "toy.onnx")
    (scan,) = store.list_scans(engine)
    assert scan.roots == [str(work / "images")]
    engine.dispose()
    monkeypatch.chdir(tmp_path)
    found = runner.invoke(
        app, ["similar", str(work / "images" / "noise_00.png"), "--db", str(work / "labels.db")]
    )
    assert found.exit_code == 0, found.output


def test_a_device_that_is_none_is_a_usage_error(toy_onnx, tmp_path):
    """--device takes auto, cpu or cuda; another is refused as a usage error (exit 2),
    before any model is loaded."""
    result = runner.invoke(
        app, ["explain", str(tmp_path), "--model", str(toy_onnx), "--device", "tpu"]
    )
    assert result.exit_code == ExitCode.USAGE
    assert "'tpu' is none of auto, cpu, cuda" in " ".join(result.output.split())


def test_explain_of_a_folder_without_images_says_so(toy_onnx, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    result = runner.invoke(
        app, ["explain", str(empty), "--model", str(toy_onnx), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert f"modlabel: no image to explain under {empty}" in result.stderr
