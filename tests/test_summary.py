"""The summary CLI prints a per-layer table and the exact parameter total."""

from __future__ import annotations

import pytest

from experiments import summary


def test_summary_prints_layers_and_total(capsys):
    assert summary.main(["--model", "cifar_resnet20", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer3_2" in out and "BasicBlock" in out
    assert "Trainable parameters: 269,722" in out
    assert "\x1b[" not in out  # no terminal colour codes when writing to a pipe


def test_summary_accepts_input_shape_and_classes(capsys):
    argv = ["--model", "resnet18", "--input-shape", "64,48,1", "--num-classes", "7", "--depth", "1"]
    assert summary.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1,64,48,1]" in out and "[1,7]" in out


def test_summary_rejects_unknown_model_and_bad_shape(capsys):
    assert summary.main(["--model", "resnet19"]) == 2
    assert "unknown model 'resnet19'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summary.main(["--model", "resnet18", "--input-shape", "224x224"])
    assert "'224x224' must be three positive integers" in capsys.readouterr().err
