"""Result records, the result file (schema, validation, writing) and the printed table."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fastshare.bench.environment import REPO_ROOT, device_slug
from fastshare.bench.timing import TimingStats


SCHEMA = "fastshare-bench/1"


@dataclass
class CaseResult:
    """One row of the results: a (case, variant, pass) with its status, timing and derived rates."""

    name: str
    group: str
    variant: str
    pass_: str
    status: str = "ok"  # "ok" | "FAILED" | "ERROR"
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timing: TimingStats | None = None
    bytes: int | None = None
    flops: float | None = None
    saved_bytes: int | None = None
    saved_param_bytes: int | None = None
    aten_ops: int | None = None
    peak_bytes: int | None = None
    prepass: dict[str, float] | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    tflops: float | None = None
    pct_matmul: float | None = None
    vs_reference: float | None = None
    vs_compile: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("timing", "pass_")}
        d["pass"] = self.pass_
        t = self.timing
        d.update({"median_ms": t.median_ms if t else None, "p20_ms": t.p20_ms if t else None,
                  "p80_ms": t.p80_ms if t else None, "rounds": t.rounds if t else 0,
                  "times_ms": list(t.times_ms) if t else []})
        return d


_REQUIRED_CASE_KEYS = ("name", "group", "variant", "pass", "status", "median_ms", "p20_ms", "p80_ms", "rounds",
                       "times_ms", "gbps", "pct_copy_bw", "vs_reference", "vs_compile")


_REQUIRED_TOP_KEYS = ("schema", "created", "device", "versions", "git_commit", "config", "reference_rates",
                      "cases")


def validate_results(doc: Mapping[str, Any]) -> list[str]:
    """Problems with a result document (empty list: valid). Checks keys, types and timing consistency."""
    problems = [f"missing top-level key {k!r}" for k in _REQUIRED_TOP_KEYS if k not in doc]
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"schema {doc['schema']!r} != {SCHEMA!r}")
    for k in ("name", "type", "slug"):
        if not isinstance(doc["device"].get(k), str):
            problems.append(f"device.{k} must be a string")
    for k in ("torch", "triton", "cuda"):
        if k not in doc["versions"]:
            problems.append(f"versions.{k} missing")
    if not isinstance(doc["cases"], list):
        return problems + ["cases must be a list"]
    for i, case in enumerate(doc["cases"]):
        missing = [k for k in _REQUIRED_CASE_KEYS if k not in case]
        if missing:
            problems.append(f"case {i}: missing {', '.join(missing)}")
            continue
        if case["status"] == "ok":
            times = case["times_ms"]
            if case["rounds"] != len(times) or not times:
                problems.append(f"case {case['name']}: rounds {case['rounds']} != {len(times)} times")
            elif not min(times) <= case["p20_ms"] <= case["median_ms"] <= case["p80_ms"] <= max(times):
                problems.append(f"case {case['name']}: p20/median/p80 inconsistent with times_ms")
        elif case["status"] in ("FAILED", "ERROR"):
            if not case.get("error"):
                problems.append(f"case {case['name']}: status {case['status']} without an error message")
        else:
            problems.append(f"case {case['name']}: unknown status {case['status']!r}")
    return problems


def default_results_path(device: torch.device | str, date: _dt.date | None = None,
                         root: Path = REPO_ROOT / "bench" / "results") -> Path:
    """``bench/results/<device-slug>-<YYYY-MM-DD>.json``, or ``...-2.json``, ``-3``, ... when that file
    exists: a second run on the same day must not replace the first one's results."""
    date = date or _dt.date.today()
    path = root / f"{device_slug(device)}-{date.isoformat()}.json"
    n = 2
    while path.exists():
        path = root / f"{device_slug(device)}-{date.isoformat()}-{n}.json"
        n += 1
    return path


def write_results(path: Path | str, env: Mapping[str, Any], config: Mapping[str, Any],
                  reference_rates: Mapping[str, Any], cases: Sequence[CaseResult],
                  skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write a validated result document (JSON) and return it."""
    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **env,
        "config": dict(config),
        "reference_rates": dict(reference_rates),
        "skipped_backends": dict(skipped or {}),
        "cases": [c.to_json() for c in cases],
    }
    if hasattr(os, "getloadavg"):
        doc.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
    problems = validate_results(doc)
    if problems:
        raise ValueError("refusing to write an invalid result file: " + "; ".join(problems))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return doc


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(results: Sequence[CaseResult]) -> str:
    """A Markdown table: one row per result (median, p20-p80, GB/s, % copy BW, TFLOP/s, % matmul, speed-up
    vs the reference and vs torch.compile, status)."""
    header = ("| case | median ms | p20-p80 ms | GB/s | % copy BW | TFLOP/s | % matmul | x ref | x compile "
              "| status |")
    lines = [header, "|" + "---|" * 10]
    for c in results:
        t = c.timing
        spread = f"{t.p20_ms:.3g}-{t.p80_ms:.3g}" if t else ""
        status = c.status if c.status == "ok" else f"{c.status}: {c.error}"
        lines.append(f"| {c.name} | {_fmt(t.median_ms if t else None, '.3f')} | {spread} | {_fmt(c.gbps, '.1f')} "
                     f"| {_fmt(c.pct_copy_bw, '.0f')} | {_fmt(c.tflops, '.2f')} | {_fmt(c.pct_matmul, '.0f')} "
                     f"| {_fmt(c.vs_reference, '.2f')} | {_fmt(c.vs_compile, '.2f')} | {status} |")
    return "\n".join(lines)
