"""Optimiser, learning-rate schedule and the trainability table logged at the start of a stage."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # parameter-name prefix -> lr, e.g. {"connector.": 2e-5}; the first matching prefix wins and
    # unmatched parameters use `lr`.
    part_lrs: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of total steps; used when warmup_steps == 0
    warmup_start_factor: float = 0.0  # lr starts at factor * peak and rises linearly to the peak
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio * peak


SCHEDULE_KINDS = ("cosine", "linear", "constant")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`.

    Parameters are split by part (the first `cfg.part_lrs` prefix that matches the name, else the
    default part) and by decay: only matrices and embeddings (ndim >= 2) decay; biases, norms and
    scalars such as a logit scale do not. Each param group keeps its `name`
    (e.g. "connector.:decay", "default:no_decay") and its `param_names` for logging and checks.
    """
    names = [name for name, _ in model.named_parameters()]
    for prefix in cfg.part_lrs:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(
                f"part_lrs prefix {prefix!r} matches no parameter of {type(model).__name__}; "
                f"top-level names: {sorted({n.split('.')[0] + '.' for n in names})}"
            )

    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = next((prefix for prefix in cfg.part_lrs if name.startswith(prefix)), "default")
        decays = param.ndim >= 2
        key = f"{part}:{'decay' if decays else 'no_decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr": cfg.part_lrs.get(part, cfg.lr),
                "weight_decay": cfg.weight_decay if decays else 0.0,
            }
        groups[key]["params"].append((name, param))

    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every requires_grad is False); "
            "unfreeze something before training"
        )
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def warmup_steps_for(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return int(round(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for the optimiser step with index `step` (0-based)."""
    warmup = warmup_steps_for(cfg, total_steps)
    if step < warmup:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / warmup
    if cfg.kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up from `warmup_start_factor * lr` to `lr`, then `kind` decay to `min_lr_ratio * lr`
    at `total_steps`. Call `scheduler.step()` once per optimiser step."""
    if cfg.kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {cfg.kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps)
    )


def describe_trainable(model: nn.Module) -> str:
    """A table of trainable and frozen parameter counts per top-level child module, plus total.

    Parameters owned directly by `model` (not by a child) are listed as "(own)".
    """
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        head, _, rest = name.partition(".")
        row = rows.setdefault(head if rest else "(own)", [0, 0])
        row[0 if param.requires_grad else 1] += param.numel()

    trainable = sum(r[0] for r in rows.values())
    frozen = sum(r[1] for r in rows.values())
    table = [(name, t, f) for name, (t, f) in rows.items()] + [("total", trainable, frozen)]
    width = max(len("module"), *(len(name) for name, _, _ in table))

    def line(name: str, t: int | str, f: int | str, share: str) -> str:
        t = f"{t:,}" if isinstance(t, int) else t
        f = f"{f:,}" if isinstance(f, int) else f
        return f"{name:<{width}}  {t:>15}  {f:>15}  {share:>10}"

    lines = [line("module", "trainable", "frozen", "trainable%")]
    for i, (name, t, f) in enumerate(table):
        if i == len(table) - 1:
            lines.append("-" * len(lines[0]))
        share = f"{100.0 * t / (t + f):.2f}%" if t + f else "-"
        lines.append(line(name, t, f, share))
    return "\n".join(lines)
