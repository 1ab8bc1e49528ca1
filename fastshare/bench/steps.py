"""Whole-step cases of an :class:`~fastshare.model.AdaShareNet`: policy-learning steps (curriculum stage 1
and L), the re-train step and inference, per backbone, executor, op backend, precision and (CUDA) graph
capture, against the sequential reference in float32 (the paper's execution)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from fastshare.bench.common import (backward_grads, cudnn_flags, data_checks, env_var, finish_ratios, log,
                                   record_timed)
from fastshare.bench.config import SuiteConfig
from fastshare.bench.op_cases import op_backends
from fastshare.bench.prepass import ORACLE_FLOOR, PrepassError, check_oracle
from fastshare.bench.rates import MatmulRates
from fastshare.bench.results import CaseResult
from fastshare.bench.timing import Timed, time_interleaved


#: Step kinds: the policy-learning step at curriculum stage 1 (one sampled block, the rest forced and
#: shared) and stage L (all blocks sampled), the re-train step and inference (both with a fixed policy).
STEP_KINDS = ("policy-stage1", "policy-stageL", "retrain", "inference")


@dataclass(frozen=True)
class StepVariant:
    """How one step runs: executor, op backend (batched executor), precision, captured in a CUDA graph.

    Names: ``sequential``, ``batched-cuda``, ``tree+bf16cl``, ``batched-cuda+bf16cl+graph``, ...
    """

    executor: str
    backend: str = ""
    precision: str = "fp32"
    graph: bool = False

    @property
    def name(self) -> str:
        base = f"{self.executor}-{self.backend}" if self.backend else self.executor
        return base + ("" if self.precision == "fp32" else f"+{self.precision}") + ("+graph" if self.graph else "")

    @property
    def eager(self) -> "StepVariant":
        return dataclasses.replace(self, graph=False)


def nyu_example_policy() -> torch.Tensor:
    """The fixed policy the paper's code uses as its 3-task NYU v2 example (ResNet-34, blocks 0..15):
    task 1 skips block 6, task 2 skips 9, 10, 11, task 3 skips 5, 10, 11. ``(3, 16)``, 1 = execute."""
    policy = torch.ones(3, 16)
    policy[0, 6] = 0
    policy[1, [9, 10, 11]] = 0
    policy[2, [5, 10, 11]] = 0
    return policy


def step_policy(k: int, n_blocks: int) -> torch.Tensor:
    """The fixed ``(K, L)`` policy of the re-train and inference cases: :func:`nyu_example_policy` for
    K = 3 tasks on 16 blocks; otherwise every task runs the first half and task ``t`` skips block ``l`` of
    the second half when ``(l + t) % 3 == 0``."""
    if (k, n_blocks) == (3, 16):
        return nyu_example_policy()
    policy = torch.ones(k, n_blocks)
    for t in range(k):
        for l in range(n_blocks // 2, n_blocks):
            if (l + t) % 3 == 0:
                policy[t, l] = 0.0
    return policy


def _executors_available() -> list[str]:
    from fastshare import executors

    return [n for n in ("batched", "tree") if n in executors._EXECUTORS]


def step_variants(step: str, device: torch.device, precisions: Sequence[str], graph: bool) -> list[StepVariant]:
    """The variants of one step case: the sequential reference in each precision; the fast executor
    (batched for the policy step, with the fastest op backend that runs: the op cases compare backends;
    tree for fixed policies) in each precision; on CUDA with ``graph``, the fast executor captured in a
    CUDA graph."""
    fast_ex = "tree" if step in ("retrain", "inference") else "batched"
    if fast_ex not in _executors_available():
        return [StepVariant("sequential", precision=p) for p in precisions]
    runnable = op_backends(device, torch.float32)[0]
    kernels = [b for b in ("cuda", "triton", "cpu") if b in runnable] or ["reference"]  # fastest first
    out: list[StepVariant] = []
    for p in precisions:
        if p == "tf32" and device.type != "cuda":
            continue  # TF32 is a CUDA tensor-core mode; on other devices it would repeat fp32
        out.append(StepVariant("sequential", precision=p))
        if fast_ex == "tree":
            fast = [StepVariant("tree", precision=p)]
        else:
            fast = [StepVariant("batched", kernels[0], p)]
        out += fast
        if graph and device.type == "cuda":
            out.append(dataclasses.replace(fast[0], graph=True))
    return out


#: The pre-pass floor per step precision: TF32 keeps float16's 10-bit mantissa.
_ORACLE_FLOOR = {"fp32": ORACLE_FLOOR[torch.float32], "tf32": ORACLE_FLOOR[torch.float16],
                 "bf16cl": ORACLE_FLOOR[torch.bfloat16]}


@dataclass
class _StepModel:
    """One model copy of a step case (fp32 NCHW, or channels_last for ``bf16cl``) with its gates."""

    model: torch.nn.Module
    x: torch.Tensor
    gates: Any
    params: list[torch.Tensor]
    names: list[str]


def _step_model(sc: Mapping[str, Any], backbone: str, step: str, device: torch.device, dtype: torch.dtype,
                precision: str, tau: float, hard: bool) -> _StepModel:
    """The model, images and gates of a step case: the same weights, images and noise for every dtype
    and precision (seeded)."""
    from fastshare.model import AdaShareNet

    torch.manual_seed(0)
    model = AdaShareNet(backbone, sc["tasks"], head_width=sc["head_width"], dropout=0.0)
    model = model.to(device=device, dtype=dtype).train(step != "inference")
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(sc["batch"], 3, sc["image"], sc["image"], device=device, generator=gen).to(dtype)
    if precision == "bf16cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if step.startswith("policy"):
        u = torch.rand(model.logits.shape, device=device, generator=gen).clamp_(1e-6, 1 - 1e-6)
        stage = 1 if step == "policy-stage1" else model.num_blocks
        gates = model.gates("sample", tau=tau, hard=hard, num_train_layers=stage, u=u.to(dtype))
    else:
        gates = model.gates("fixed", policy=step_policy(model.num_tasks, model.num_blocks))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return _StepModel(model, x, gates, list(params), list(names))


@contextlib.contextmanager
def _precision(precision: str, device: torch.device, graph: bool = False) -> Iterator[None]:
    """``fp32``: TF32 off in cuDNN and matmuls (IEEE float32, like the float64 oracle's arithmetic);
    ``tf32``: TF32 on in both; ``bf16cl``: bfloat16 autocast (its cast cache off inside a CUDA graph
    capture, as PyTorch advises). cuDNN's other flags (algorithm search, determinism) stay as the run
    set them."""
    if precision == "bf16cl":
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph):
            yield
        return
    if device.type != "cuda":
        yield
        return
    tf32 = precision == "tf32"
    old_mm = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with cudnn_flags(enabled=True, allow_tf32=tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm


def _step_call(sm: _StepModel, step: str, variant: StepVariant, capturing: bool = False
               ) -> list[torch.Tensor | None]:
    """One eager step of ``variant``: inference: the task outputs (no grad); otherwise the gradients of every
    trainable parameter of the loss ``sum_t mean(out_t^2)`` (a float32 sum under autocast)."""
    from fastshare import use_backend

    device = sm.x.device
    with _precision(variant.precision, device, capturing), use_backend(variant.backend or "reference"):
        if step == "inference":
            with torch.no_grad():
                return list(sm.model(sm.x, sm.gates, executor=variant.executor).values())
        outs = sm.model(sm.x, sm.gates, executor=variant.executor)
        loss = sum(o.float().square().mean() for o in outs.values())
    return backward_grads(loss, sm.params)


def capture_cuda_graph(fn: Callable[[], Any], warmup: int = 2) -> tuple[Callable[[], None], Any]:
    """Capture ``fn()`` (static shapes and addresses, no host syncs) in a CUDA graph after ``warmup`` eager
    calls on a side stream; returns ``(replay, static result)``: each ``replay()`` recomputes the static
    result in place (gradients land in the ``.grad`` tensors that the captured call created)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph.replay, static


def _graph_step(sm: _StepModel, step: str, variant: StepVariant) -> tuple[Callable[[Any], object],
                                                                         list[torch.Tensor | None]]:
    """``variant``'s eager step captured in a CUDA graph: ``(run, static results)``."""
    eager = variant.eager

    def fn() -> list[torch.Tensor | None]:
        with data_checks(False):
            return _step_call(sm, step, eager, capturing=True)

    replay, static = capture_cuda_graph(fn)

    def run(_: Any) -> list[torch.Tensor | None]:
        replay()
        return static  # held here: the replays write into these tensors

    return run, static


def run_step_cases(cfg: SuiteConfig, device: torch.device, matmul: "MatmulRates",
                   selected: Callable[[str], bool],
                   progress: Callable[[list[CaseResult]], None] | None = None) -> list[CaseResult]:
    """Policy-learning steps (curriculum stage 1 and L), the re-train step and inference of a whole
    AdaShareNet, per backbone, executor, backend, precision and (CUDA) graph capture.

    Every variant's ``x ref`` is against the sequential reference in float32 (the paper's execution). The
    pre-pass checks each variant against a float64 sequential oracle with the reference in the variant's
    own precision as the yardstick (:func:`check_oracle`); a CUDA-graph variant is checked on its replayed
    results. The loss is the sum over tasks of the mean square of each task's output (the task losses are
    a negligible part of a step; every variant computes the same one). ``progress`` receives the results
    so far after each group (a long run keeps what it measured when it is cut short).
    """
    sc = cfg.step
    results: list[CaseResult] = []
    for backbone in sc["backbones"]:
        for step in STEP_KINDS:
            group = f"step/{backbone}/{step}"
            variants = [v for v in step_variants(step, device, sc["precisions"], sc["graph"])
                        if selected(f"{group}/{v.name}")]
            if not variants:
                continue
            log(f"[bench] {group}: {', '.join(v.name for v in variants)}")
            results += _run_step_group(cfg, device, matmul, backbone, step, group, variants)
            finish_ratios(results, "sequential", "vs_reference")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress is not None:
                progress(results)
    return results


@contextlib.contextmanager
def _oracle_settings() -> Iterator[None]:
    """The float64 oracle: padded convolutions (the spec; no split timing for a dtype nobody times) and no
    cuDNN algorithm search (under ``--cudnn-benchmark`` it would search every float64 convolution)."""
    with env_var("FASTSHARE_CONV_SPLIT", "never"), cudnn_flags(benchmark=False):
        yield


def _run_step_group(cfg: SuiteConfig, device: torch.device, matmul: "MatmulRates", backbone: str, step: str,
                    group: str, variants: Sequence[StepVariant]) -> list[CaseResult]:
    sc = cfg.step
    models = {p: _step_model(sc, backbone, step, device, torch.float32, p, cfg.tau, cfg.hard)
              for p in {v.precision for v in variants} | {"fp32"}}
    with _oracle_settings():
        sm64 = _step_model(sc, backbone, step, device, torch.float64, "fp32", cfg.tau, cfg.hard)
        oracle = _step_call(sm64, step, StepVariant("sequential"))
        del sm64
    labels = list(models["fp32"].model.tasks) if step == "inference" else [f"d{n}" for n in models["fp32"].names]
    refs = {p: _step_call(models[p], step, StepVariant("sequential", precision=p)) for p in models}
    runs: dict[StepVariant, Callable[[Any], object]] = {}
    failed: dict[StepVariant, tuple[str, str]] = {}
    for v in variants:
        sm = models[v.precision]
        try:
            if v.graph:
                runs[v], got = _graph_step(sm, step, v)
                runs[v](None)
                torch.cuda.synchronize(device)
            else:
                runs[v] = (lambda _, sm=sm, v=v: _step_call(sm, step, v))
                got = _step_call(sm, step, v)
            if v.executor != "sequential":
                for lab, a, b, o in zip(labels, got, refs[v.precision], oracle):
                    check_oracle(lab, a, b, o, _ORACLE_FLOOR[v.precision])
        except PrepassError as exc:
            failed[v] = ("FAILED", str(exc))
        except Exception as exc:  # an executor or a capture that crashes is reported, the suite goes on
            failed[v] = ("ERROR", f"{type(exc).__name__}: {exc}")
        if v in failed:
            runs.pop(v, None)
            log(f"[bench] {group}/{v.name}: {failed[v][0]}: {failed[v][1][:200]}")
    del oracle, refs
    items = {v: Timed(run) for v, run in runs.items()}
    with data_checks(cfg.data_checks_while_timing):
        stats = time_interleaved(items, device, warmup=1, min_rounds=cfg.step_rounds,
                                 max_rounds=cfg.step_rounds) if items else {}
    m = models["fp32"].model
    info = {"backbone": backbone, "step": step, **{k: v for k, v in sc.items() if k not in ("backbones",)},
            "tau": cfg.tau, "hard": cfg.hard,
            "gates": ("sampled, curriculum stage " + ("1" if step == "policy-stage1" else f"L = {m.num_blocks}"))
            if step.startswith("policy") else "fixed: " + str(step_policy(m.num_tasks, m.num_blocks).int().tolist())}
    results = []
    for v in variants:
        res = CaseResult(f"{group}/{v.name}", group, v.name, "fwd" if step == "inference" else "fwd+bwd",
                         params={**info, "precision": v.precision, "cuda_graph": v.graph})
        if v in failed:
            res.status, res.error = failed[v]
        else:
            # Counters come from the eager run (a graph replay dispatches no ATen ops to count).
            sm, eager = models[v.precision], v.eager
            record_timed(res, lambda _: _step_call(sm, step, eager), sm.params, device, stats[v],
                         matmul.get("bf16") if v.precision == "bf16cl"
                         else matmul.get("fp32", tf32=v.precision == "tf32"))
        results.append(res)
    return results
