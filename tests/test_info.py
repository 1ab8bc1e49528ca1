"""``python -m fastshare.info`` reports versions and explains unavailable backends."""

import subprocess
import sys

from fastshare.info import collect, format_info


def test_info_lists_every_backend_with_reasons():
    info = collect()
    table = info["backends"]["cpu"]
    assert set(table) == {"reference", "cpu", "cuda", "triton"}
    assert table["reference"] == []
    assert any("CUDA tensors" in why for why in table["cuda"])
    text = format_info(info)
    assert "reference  available" in text and "cuda       unavailable" in text


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "fastshare.info"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "backends for cpu tensors" in out.stdout


def test_info_reports_settings(monkeypatch):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "never")
    monkeypatch.delenv("FASTSHARE_BACKEND", raising=False)
    info = collect()
    assert info["settings"]["FASTSHARE_CONV_SPLIT"] == "never" and info["settings"]["FASTSHARE_BACKEND"] == "auto"
    assert "FASTSHARE_CONV_SPLIT     never" in format_info(info)
