"""``python -m fastshare.info`` reports versions and explains unavailable backends."""

import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), (" yes ", True),
                                             ("0", False), ("False", False), ("off", False), ("no", False),
                                             ("", "default")])
def test_env_flag_reads_the_usual_spellings(monkeypatch, value, expected):
    from fastshare._env import env_flag

    monkeypatch.setenv("FASTSHARE_TEST_FLAG", value)
    for default in (False, True):
        assert env_flag("FASTSHARE_TEST_FLAG", default) is (default if expected == "default" else expected)


def test_env_flag_rejects_other_values(monkeypatch):
    """FASTSHARE_DETERMINISTIC=ture must not silently mean off."""
    from fastshare._env import env_flag
    from fastshare.ops import deterministic_reductions

    monkeypatch.setenv("FASTSHARE_DETERMINISTIC", "ture")
    with pytest.raises(ValueError, match="FASTSHARE_DETERMINISTIC='ture': expected 1/0, true/false"):
        deterministic_reductions()
    monkeypatch.setenv("FASTSHARE_DETERMINISTIC", "true")
    assert deterministic_reductions()
    monkeypatch.delenv("FASTSHARE_TEST_FLAG", raising=False)
    assert env_flag("FASTSHARE_TEST_FLAG", True) is True
