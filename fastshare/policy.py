"""AdaShare's select-or-skip policy: per-forward gates, temperature, curriculum, architecture sampling.

Logits ``alpha`` have shape ``(K, Lp, 2)`` for K tasks and the ``Lp = L - skip_layer`` gated blocks (the
first ``skip_layer`` blocks always execute); column 0 = execute, column 1 = skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastshare._validation import check_finite, check_tau

__all__ = [
    "Gates",
    "draw_uniform",
    "temperature",
    "curriculum_stage",
    "sample_architectures",
    "argmax_policy",
    "select_probability",
]

FORCED, SAMPLED, FIXED = "forced", "sampled", "fixed"
# Uniform noise is clamped into (U_EPS, 1 - U_EPS) so that -log(-log u) stays finite in float32.
U_EPS = 1e-6


def draw_uniform(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform noise for the Gumbel gate, strictly inside (0, 1)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return u.clamp_(U_EPS, 1 - U_EPS)


@dataclass(frozen=True)
class Gates:
    """The gate of every (task, block) for one forward pass.

    Attributes:
        kinds: length-L tuple; block ``l`` is ``"forced"`` (executed, gate (1, 0), no logits),
            ``"sampled"`` (Gumbel-Softmax of ``alpha[:, l - offset]`` with noise ``u[:, l - offset]``) or
            ``"fixed"`` (hard 0/1 gate from ``policy[:, l]``).
        num_tasks: K.
        alpha: ``(K, Lp, 2)`` logits (sampled blocks only), or None.
        u: ``(K, Lp, 2)`` uniform noise, or None.
        policy: ``(K, L)`` 0/1 float (1 = execute) for fixed gates, or None.
        tau: temperature of sampled gates.
        hard: straight-through one-hot sampled gates.
        policy_rows: derived: ``policy`` as host integers, read once when the gates are made, so that
            executors plan without reading device memory (e.g. inside a captured CUDA graph); None without
            a policy.
    """

    kinds: tuple[str, ...]
    num_tasks: int
    alpha: torch.Tensor | None = None
    u: torch.Tensor | None = None
    policy: torch.Tensor | None = None
    tau: float = 1.0
    hard: bool = False
    policy_rows: tuple[tuple[int, ...], ...] | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.policy is not None:
            rows = tuple(tuple(int(v) for v in row) for row in self.policy.tolist())
            object.__setattr__(self, "policy_rows", rows)

    @property
    def num_blocks(self) -> int:
        return len(self.kinds)

    @property
    def offset(self) -> int:
        """Index of the first logit row: ``L - Lp``."""
        return self.num_blocks - (self.alpha.shape[1] if self.alpha is not None else 0)

    @classmethod
    def full(cls, num_tasks: int, num_blocks: int) -> "Gates":
        """Every block executed for every task (warm-up, hard sharing)."""
        return cls((FORCED,) * num_blocks, num_tasks)

    @classmethod
    def sample(cls, alpha: torch.Tensor, tau: float, hard: bool, num_blocks: int,
               num_train_layers: int | None = None, u: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> "Gates":
        """Gumbel-Softmax gates with the curriculum.

        Args:
            alpha: ``(K, Lp, 2)`` logits, ``Lp <= num_blocks``.
            tau, hard: temperature and straight-through flag.
            num_blocks: L.
            num_train_layers: curriculum stage n: only the last ``min(n, Lp)`` blocks are sampled, the
                others forced. None: all ``Lp``.
            u: ``(K, Lp, 2)`` uniform noise; drawn from ``generator`` if None.
        """
        check_tau(tau)
        if alpha.ndim != 3 or alpha.shape[-1] != 2:
            raise ValueError(f"alpha must have shape (K, Lp, 2), got {tuple(alpha.shape)}")
        n_logits = alpha.shape[1]
        if n_logits > num_blocks:
            raise ValueError(f"alpha has {n_logits} block rows but the backbone has {num_blocks} blocks")
        check_finite("policy logits", alpha.detach())
        n = n_logits if num_train_layers is None else int(num_train_layers)
        if n < 1:
            raise ValueError(f"num_train_layers must be >= 1, got {num_train_layers}")
        n = min(n, n_logits)
        if u is None:
            u = draw_uniform(tuple(alpha.shape), generator, alpha.device, torch.float32)
        elif u.shape != alpha.shape:
            raise ValueError(f"u must have alpha's shape {tuple(alpha.shape)}, got {tuple(u.shape)}")
        kinds = (FORCED,) * (num_blocks - n) + (SAMPLED,) * n
        return cls(kinds, alpha.shape[0], alpha=alpha, u=u, tau=float(tau), hard=bool(hard))

    @classmethod
    def fixed(cls, policy: torch.Tensor) -> "Gates":
        """Hard gates from a ``(K, L)`` 0/1 policy (1 = execute), e.g. a sampled architecture."""
        if policy.ndim != 2:
            raise ValueError(f"a fixed policy must have shape (K, L), got {tuple(policy.shape)}")
        values = policy.detach().to(torch.float32)
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError("a fixed policy must hold only 0 (skip) and 1 (execute)")
        return cls((FIXED,) * policy.shape[1], policy.shape[0], policy=values)

    def block_alpha(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, u)`` of block ``l`` for all tasks, each ``(K, 2)``."""
        i = l - self.offset
        return self.alpha[:, i], self.u[:, i]

    def fixed_values(self, l: int) -> torch.Tensor:
        """``(K, 2)`` one-hot gates of a fixed block: ``(p, 1 - p)``."""
        p = self.policy[:, l]
        return torch.stack((p, 1 - p), dim=-1)

    def is_shared(self, l: int) -> bool:
        """Whether block ``l``'s output is the same tensor for all tasks given a shared input.

        True for forced blocks and for fixed blocks on which all tasks agree.
        """
        kind = self.kinds[l]
        if kind == FORCED:
            return True
        if kind == FIXED:
            return len({row[l] for row in self.policy_rows}) == 1
        return False

    def shared_prefix(self) -> int:
        """Number of leading blocks computed once for all tasks (see :meth:`is_shared`)."""
        n = 0
        while n < self.num_blocks and self.is_shared(n):
            n += 1
        return n


def temperature(init_temp: float, decay_temp: float, num_decays: int) -> float:
    """AdaShare's temperature: ``init_temp * decay_temp ** num_decays`` (decayed once per policy epoch)."""
    check_tau(init_temp)
    if not 0 < decay_temp <= 1:
        raise ValueError(f"decay_temp must be in (0, 1], got {decay_temp}")
    if num_decays < 0:
        raise ValueError(f"num_decays must be >= 0, got {num_decays}")
    return init_temp * decay_temp ** num_decays


def curriculum_stage(policy_epoch: int, curriculum_speed: int, num_policy_blocks: int,
                     is_curriculum: bool = True) -> int:
    """Number of trained (sampled) blocks at a policy epoch: ``min(Lp, epoch // speed + 1)``; Lp if off."""
    if policy_epoch < 0:
        raise ValueError(f"policy_epoch must be >= 0, got {policy_epoch}")
    if not is_curriculum:
        return num_policy_blocks
    if curriculum_speed < 1:
        raise ValueError(f"curriculum_speed must be >= 1, got {curriculum_speed}")
    return min(num_policy_blocks, policy_epoch // curriculum_speed + 1)


def _pad_skipped(policy: torch.Tensor, num_blocks: int) -> torch.Tensor:
    k, lp = policy.shape
    pad = torch.ones(k, num_blocks - lp, dtype=policy.dtype, device=policy.device)
    return torch.cat((pad, policy), dim=1)


def argmax_policy(alpha: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
    """``(K, L)`` 0/1 policy: execute where ``alpha[..., 0] >= alpha[..., 1]``.

    With ``num_blocks`` (L > Lp) the first ``L - Lp`` (always executed) blocks are prepended as 1. NaN or
    infinite logits raise ``ValueError`` (NaN would compare False: a silent all-skip policy).
    """
    check_finite("policy logits", alpha.detach())
    policy = (alpha[..., 0] >= alpha[..., 1]).to(torch.float32)
    return _pad_skipped(policy, num_blocks) if num_blocks is not None else policy


def sample_architectures(alpha: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
                         num_blocks: int | None = None) -> list[torch.Tensor]:
    """Draw policies from ``softmax(alpha)``: each block executed with probability ``softmax(alpha)[..., 0]``.

    Returns ``num_samples`` ``(K, L)`` 0/1 policies (see :func:`argmax_policy` for ``num_blocks``).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    check_finite("policy logits", alpha.detach())
    p_exec = torch.softmax(alpha.detach().float().cpu(), dim=-1)[..., 0]
    out = []
    for _ in range(num_samples):
        draw = (torch.rand(p_exec.shape, generator=generator) < p_exec).to(torch.float32)
        out.append(_pad_skipped(draw, num_blocks) if num_blocks is not None else draw)
    return out


def select_probability(alpha: torch.Tensor) -> torch.Tensor:
    """``softmax(alpha)[..., 0]``: the probability of executing each block, ``(K, Lp)``."""
    return torch.softmax(alpha.detach().float(), dim=-1)[..., 0]
