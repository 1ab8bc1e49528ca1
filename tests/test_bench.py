"""Unit tests of the benchmark helpers in :mod:`fastshare.bench` (fast: the whole file runs in seconds)."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
import torch

from fastshare import bench, reference


def test_quantile_and_timing_stats():
    assert bench.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert bench.quantile([5.0], 0.8) == 5.0
    stats = bench.timing_stats([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats.median_ms, stats.p20_ms, stats.p80_ms, stats.rounds) == (3.0, 1.8, 4.2, 5)
    with pytest.raises(ValueError):
        bench.quantile([], 0.5)
    with pytest.raises(ValueError):
        bench.quantile([1.0], 1.5)


def test_time_interleaved_rounds_and_order():
    calls: list[str] = []
    prepared: list[int] = []

    def prepare(i: int) -> int:
        prepared.append(i)
        return i

    items = {"a": bench.Timed(lambda _: calls.append("a"), prepare), "b": bench.Timed(lambda _: calls.append("b"))}
    stats = bench.time_interleaved(items, "cpu", warmup=2, min_rounds=4, max_rounds=4)
    assert stats["a"].rounds == stats["b"].rounds == 4
    assert calls[4:] == ["a", "b"] * 4  # warm-up (2 each), then interleaved rounds
    assert prepared == [0, 1, 0, 1, 2, 3]  # prepare gets the round index (input rotation)
    assert all(t >= 0 for t in stats["a"].times_ms)


def test_interleaved_seconds_fixed_rounds():
    calls: list[str] = []

    def sleeper(name: str, seconds: float) -> bench.Timed:
        return bench.Timed(lambda _: (calls.append(name), time.sleep(seconds)))

    times = bench.interleaved_seconds({"fast": sleeper("fast", 0.0), "slow": sleeper("slow", 0.02)}, 3)
    assert calls == ["fast", "slow"] * 4  # one warm-up each, then 3 interleaved rounds
    assert [len(t) for t in times.values()] == [3, 3]
    assert min(times["slow"]) >= 0.02 > max(times["fast"])  # seconds, not milliseconds
    with pytest.raises(ValueError, match="rounds"):
        bench.interleaved_seconds({"fast": sleeper("fast", 0.0)}, 0)


def test_bytes_accounting():
    n = 12 * 64 * 64 * 64
    assert bench.gated_residual_bytes(n, torch.float32, "fwd") == 3 * n * 4
    assert bench.gated_residual_bytes(n, torch.bfloat16, "bwd") == 5 * n * 2
    assert bench.gated_residual_bytes(n, torch.float32, "fwd+bwd") == 8 * n * 4
    with pytest.raises(ValueError):
        bench.gated_residual_bytes(n, torch.float32, "backward")
    assert bench.gbps(2e9, 1000.0) == pytest.approx(2.0)
    assert bench.rotation_copies(10 << 20, 50 << 20) == 4  # capped
    assert bench.rotation_copies(200 << 20, 50 << 20) == 1


def test_rates_are_positive():
    assert bench.measure_copy_bandwidth("cpu", 8 << 20, rounds=3) > 0
    assert bench.measure_matmul_tflops("cpu", torch.float32, 128, rounds=3) > 0


def test_device_slug_and_commit():
    assert bench.device_slug("cpu", "Intel(R) Xeon(R) Platinum 8480+") == "cpu-intel-r-xeon-r-platinum-8480"
    assert bench.device_slug("cuda", "NVIDIA H100 80GB HBM3") == "cuda-nvidia-h100-80gb-hbm3"
    commit = bench.git_commit()
    assert commit == "unknown" or len(commit) == 40
    path = bench.default_results_path("cpu", dt.date(2026, 1, 2))
    assert path.name.endswith("-2026-01-02.json") and path.parent.name == "results"


def test_default_results_path_never_names_an_existing_file(tmp_path):
    day = dt.date(2026, 1, 2)
    first = bench.default_results_path("cpu", day, root=tmp_path)
    first.write_text("{}")
    second = bench.default_results_path("cpu", day, root=tmp_path)
    assert second.name == first.name.replace(".json", "-2.json")
    second.write_text("{}")
    assert bench.default_results_path("cpu", day, root=tmp_path).name == first.name.replace(".json", "-3.json")


def _inputs(dtype=torch.float32):
    return bench.gated_residual_inputs([6, 4, 5, 3], dtype, "cpu", segments=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepass_accepts_reference(dtype):
    inp = _inputs(dtype)
    errors = bench.check_gated_residual(bench.op_forward("reference", inp.tau, inp.hard), inp)
    assert set(errors) == {"out", "df", "dr", "dalpha"}


def test_prepass_refuses_wrong_forward():
    inp = _inputs()

    def wrong(f, r, alpha, u, seg):  # 1% off
        return reference.gated_residual_ref(f, r, alpha, u, inp.tau, inp.hard, seg) * 1.01

    with pytest.raises(bench.PrepassError, match="forward out"):
        bench.check_gated_residual(wrong, inp)


def test_prepass_refuses_wrong_gate_gradient():
    inp = _inputs()

    def wrong(f, r, alpha, u, seg):  # right values, but the gate gradient is cut off
        return reference.gated_residual_ref(f, r, alpha.detach(), u, inp.tau, inp.hard, seg) + 0 * alpha.sum()

    with pytest.raises(bench.PrepassError, match="dalpha"):
        bench.check_gated_residual(wrong, inp)


def test_prepass_refuses_crashing_kernel():
    def crash(f, r, alpha, u, seg):
        raise RuntimeError("illegal memory access")

    with pytest.raises(bench.PrepassError, match="illegal memory access"):
        bench.check_gated_residual(crash, _inputs())


def test_check_oracle():
    oracle = torch.linspace(1, 2, 10, dtype=torch.float64)
    same = oracle.float() + 1e-6
    assert bench.check_oracle("x", same.clone(), same, oracle, 1e-4) < 1e-5
    with pytest.raises(bench.PrepassError):
        bench.check_oracle("x", same * 1.01, same, oracle, 1e-4)
    assert bench.check_oracle("g", None, torch.zeros(3), torch.zeros(3, dtype=torch.float64), 1e-4) == 0.0
    with pytest.raises(bench.PrepassError, match="missing"):
        bench.check_oracle("g", None, same, oracle, 1e-4)


def _result(status="ok"):
    res = bench.CaseResult("gr/x/fp32/reference/fwd", "gr/x/fp32", "reference", "fwd", status=status)
    if status == "ok":
        res.timing = bench.timing_stats([1.0, 2.0, 3.0])
        res.gbps, res.pct_copy_bw, res.vs_reference = 1.0, 10.0, 1.0
    else:
        res.error = "out of tolerance"
    return res


def test_result_file_schema(tmp_path):
    env = bench.environment("cpu")
    path = tmp_path / "r.json"
    doc = bench.write_results(path, env, {"quick": True}, {"copy_gbps": 10.0}, [_result(), _result("FAILED")])
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(doc))
    assert bench.validate_results(loaded) == []
    assert loaded["cases"][0]["median_ms"] == 2.0 and loaded["cases"][0]["rounds"] == 3
    broken = dict(loaded, cases=[dict(loaded["cases"][0], p20_ms=99.0)])
    assert any("inconsistent" in p for p in bench.validate_results(broken))
    assert "missing top-level key 'cases'" in bench.validate_results({k: v for k, v in loaded.items()
                                                                       if k != "cases"})


def test_format_table_marks_failures():
    table = bench.format_table([_result(), _result("FAILED")])
    assert "| gr/x/fp32/reference/fwd | 2.000 |" in table
    assert "FAILED: out of tolerance" in table


def test_main_quick_writes_valid_json(tmp_path, monkeypatch):
    from fastshare.ops import pruned_conv

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("FASTSHARE_CONV_SPLIT", raising=False)
    key = ("cuda:0", torch.float32, (16, 512, 41, 41), False, (1024, 512, 3, 3), True, 24, True, False, False)
    monkeypatch.setattr(pruned_conv, "split_choice_cache", {key: True})
    out = tmp_path / "res.json"
    rc = bench.main(["--quick", "--device", "cpu", "--filter", "gr/12x64x64x64/fp32/reference/fwd", "--out",
                     str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert bench.validate_results(doc) == []
    names = [c["name"] for c in doc["cases"]]
    assert names == ["gr/12x64x64x64/fp32/reference/fwd", "gr/12x64x64x64/fp32/reference/fwd+bwd"]
    assert all(c["status"] == "ok" and c["gbps"] > 0 and c["vs_reference"] == 1.0 for c in doc["cases"])
    assert doc["device"]["type"] == "cpu" and doc["config"]["filter"] == ["gr/12x64x64x64/fp32/reference/fwd"]
    assert doc["config"]["conv_split"] == {"mode": "auto", "choices": [
        {"device": "cuda:0", "dtype": "torch.float32", "x_shape": [16, 512, 41, 41], "channels_last": False,
         "weight_shape": [1024, 512, 3, 3], "bias": True, "dilation": 24, "backward": True, "tf32": False,
         "cudnn_benchmark": False, "split": True}]}
    assert doc["config"]["cudnn_benchmark"] is False


def test_main_cudnn_benchmark_flag_holds_for_the_run_only(tmp_path, monkeypatch):
    from fastshare.bench import suite

    seen: list[bool] = []
    real = suite.run_suite

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "run_suite", spy)
    before = torch.backends.cudnn.benchmark
    out = tmp_path / "res.json"
    assert bench.main(["--quick", "--device", "cpu", "--cudnn-benchmark", "--filter",
                       "gr/12x64x64x64/fp32/reference/fwd+bwd", "--out", str(out)]) == 0
    assert seen == [True] and torch.backends.cudnn.benchmark == before
    assert json.loads(out.read_text())["config"]["cudnn_benchmark"] is True


def test_main_precisions_option(tmp_path, monkeypatch):
    from fastshare.bench import suite

    seen = []
    monkeypatch.setattr(suite, "run_suite", lambda cfg, *a, **k: (seen.append(cfg.step["precisions"]),
                                                                  ({}, [], {}))[1])
    assert bench.main(["--quick", "--device", "cpu", "--precisions", "fp32,tf32", "--out", str(tmp_path)]) == 2
    assert seen == [["fp32", "tf32"]]  # (then no case: exit 2)
    assert bench.main(["--quick", "--device", "cpu", "--precisions", "fp64", "--out", str(tmp_path)]) == 2
    assert seen == [["fp32", "tf32"]]  # refused before running


def test_main_no_match(tmp_path):
    assert bench.main(["--quick", "--device", "cpu", "--filter", "no-such-case", "--out", str(tmp_path)]) == 2


def test_step_variants_and_policy():
    names = [v.name for v in bench.step_variants("policy-stage1", torch.device("cpu"), ["fp32", "tf32", "bf16cl"],
                                                 True)]
    fast = "batched-cpu" if "cpu" in bench.op_backends("cpu", torch.float32)[0] else "batched-reference"
    # No TF32 and no CUDA graph on the CPU.
    assert names == ["sequential", fast, "sequential+bf16cl", f"{fast}+bf16cl"]
    names = [v.name for v in bench.step_variants("inference", torch.device("cpu"), ["fp32"], False)]
    assert names == ["sequential", "tree"]
    policy = bench.step_policy(3, 16)
    assert [torch.nonzero(row == 0).flatten().tolist() for row in policy] == [[6], [9, 10, 11], [5, 10, 11]]
    assert bench.step_policy(2, 8).shape == (2, 8)


def _tiny_step_cfg():
    cfg = bench.suite_config("cpu", True)
    cfg.step = {**cfg.step, "image": 33, "batch": 2, "head_width": 16}
    cfg.step_rounds = 2
    return cfg


def test_step_cases_time_checked_variants():
    dev = torch.device("cpu")
    res = bench.run_step_cases(_tiny_step_cfg(), dev, bench.MatmulRates(dev, 64, ["fp32"]),
                               lambda name: "/policy-stage1/" in name)
    assert [r.variant.split("-")[0] for r in res] == ["sequential", "batched"]
    assert all(r.status == "ok" and r.timing.rounds == 2 and r.flops > 0 for r in res)
    assert res[0].vs_reference == 1.0


def test_step_cases_refuse_a_wrong_executor(monkeypatch):
    from fastshare.executors import batched

    head = batched._head
    monkeypatch.setattr(batched, "_head", lambda module, h: head(module, h) * 1.001)
    dev = torch.device("cpu")
    res = bench.run_step_cases(_tiny_step_cfg(), dev, bench.MatmulRates(dev, 64, ["fp32"]),
                               lambda name: "/policy-stageL/" in name)
    status = {r.variant.split("-")[0]: r for r in res}
    assert status["sequential"].status == "ok"
    assert status["batched"].status == "FAILED" and "relative error" in status["batched"].error
    assert status["batched"].timing is None


def test_source_digest_follows_code_not_git(tmp_path):
    (tmp_path / "fastshare").mkdir()
    (tmp_path / "fastshare" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = bench.source_digest(tmp_path)
    assert len(first) == 64 and first == bench.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("changed, but not code")
    assert bench.source_digest(tmp_path) == first
    (tmp_path / "fastshare" / "a.py").write_text("x = 2\n")
    assert bench.source_digest(tmp_path) != first
    assert "source_sha256" in bench.environment("cpu")


def test_matmul_rates_keep_ieee_float32_apart():
    rates = bench.MatmulRates(torch.device("cpu"), 64, ["fp32"])
    assert rates.get("fp32", tf32=False) > 0 and rates.get("fp32") > 0
    assert set(rates.measured) == {"fp32", "fp32-ieee"}
    assert rates.get("bf16") is None  # not in the config: no rate, no % matmul
