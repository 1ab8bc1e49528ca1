"""The pytest-benchmark files in bench/ (not part of the default run) still import, and the quick ones run:
a refactor of the code they drive must not leave them broken (bench_heads.py once was, silently)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_FILES = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "FASTSHARE_BENCH_ROUNDS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "python_files=bench_*.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_bench_file_collects():
    r = _pytest("--collect-only", *[f"bench/{f}" for f in BENCH_FILES])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in BENCH_FILES:
        assert f in r.stdout, f"{f} collected no test"


@pytest.mark.parametrize("name", ["bench_heads.py", "bench_block.py"])
def test_quick_bench_file_runs(name):
    r = _pytest("--benchmark-only", f"bench/{name}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
