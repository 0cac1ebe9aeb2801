"""drpost.precision: bf16 autocast where bf16 GEMMs have no native kernel (an AVX2-only CPU) is
several times slower than fp32; the recipes and the bench say so once, with the switch to turn it
off, and the bench report marks such a table."""
import json
import logging
from pathlib import Path

import pytest
import torch

from drpost import precision
from drpost.bench_report import format_report
from drpost.config import Config
from drpost.recipes.sft import autocast_dtype

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: False)
    monkeypatch.setattr(precision, "_WARNED", set())


def test_slow_bf16_is_warned_once_with_the_fix(no_native_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="drpost.precision"):
        assert precision.warn_if_slow_bf16(True, "Pass --no-bf16.", "cpu")
        assert precision.warn_if_slow_bf16(True, "Pass --no-bf16.", "cpu")
        assert not precision.warn_if_slow_bf16(False, "Pass --no-bf16.", "cpu")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1
    assert "no native bf16 matrix multiply" in msgs[0] and msgs[0].endswith("Pass --no-bf16.")
    assert torch.backends.cpu.get_cpu_capability() in msgs[0]


def test_the_recipes_autocast_warns_and_keeps_what_was_asked(no_native_bf16, caplog):
    cfg = Config()
    cfg.train.bf16 = True
    with caplog.at_level(logging.WARNING, logger="drpost.precision"):
        assert autocast_dtype(cfg) is torch.bfloat16     # the user's choice stands; they are told
    assert any("train.bf16: false" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cfg.train.bf16 = False
    precision._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="drpost.precision"):
        assert autocast_dtype(cfg) is None
    assert not caplog.records


def test_native_bf16_answers_for_this_machine():
    precision.native_bf16.cache_clear()
    assert isinstance(precision.native_bf16("cpu"), bool)
    assert precision.native_bf16("cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_the_bench_report_marks_a_bf16_table_without_native_kernels():
    report = json.loads((ROOT / "docs" / "performance" / "bench-B8-T128-V1-bf16-cpu.json").read_text())
    report["machine"]["native_bf16"] = True
    assert "no native bf16" not in format_report(report).splitlines()[0]
    report["machine"]["native_bf16"] = False
    assert "bf16 (no native bf16 GEMM here: generic kernels)" in format_report(report).splitlines()[0]
