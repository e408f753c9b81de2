"""Devices (CUDA only when it really loads) and `modlabel bench` (figures, not timings)."""

from __future__ import annotations

import logging
import re

import pytest
from typer.testing import CliRunner

from modlabel.cli import app
from modlabel.errors import ModelError
from modlabel.model import OnnxModel, providers_for


def test_a_cuda_request_without_cuda_ends_on_the_cpu_with_one_log_line(tiny_onnx, caplog):
    with caplog.at_level(logging.WARNING, logger="modlabel"):
        model = OnnxModel(tiny_onnx, device="cuda")
    if "CUDAExecutionProvider" in model.session.get_providers():
        assert model.device == "cuda"  # a machine with a GPU: it really loaded
        return
    assert model.device == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "CUDA was asked for but did not load (no GPU or no CUDA libraries); running on the CPU"
    ]
    logits, activations = model.run(
        model.preprocess(__import__("numpy").zeros((2, 48, 48, 3), "uint8"))
    )
    assert logits.shape == (2, 7) and activations.shape[0] == 2


def test_cpu_and_auto_devices(tiny_onnx, caplog):
    with caplog.at_level(logging.WARNING, logger="modlabel"):
        assert OnnxModel(tiny_onnx, device="cpu").device == "cpu"
        OnnxModel(tiny_onnx, device="auto")
    assert caplog.records == []  # auto never warns: it asks for CUDA only where it can load
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match="unknown device 'tpu'"):
        providers_for("tpu")


def test_scan_takes_a_device(tiny_archive, tiny_onnx, tmp_path):
    result = CliRunner().invoke(
        app, ["scan", str(tiny_archive), "--model", str(tiny_onnx), "--db",
              str(tmp_path / "x.db"), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_bench_prints_every_figure(tiny_archive, tiny_onnx, tmp_path):
    result = CliRunner().invoke(
        app, ["bench", str(tiny_archive), "--model", str(tiny_onnx), "--sample", "14",
              "--batch-size", "4", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("14 images, batch 4")
    labels = ("bare model", "whole scan", "decode, isolated workers", "decode, threads",
              "CRM + codec", "peak RSS", "a decode worker:")  # fmt: skip
    for label in labels:
        line = next(li for li in out.splitlines() if label in li)
        value = float(re.findall(r"\d[\d,]*\.?\d*", line.split(label)[1])[0].replace(",", ""))
        assert value > 0, line
    assert re.search(r"database writes \(sqlite:///.*\): [\d,]+ rows/s", out)
