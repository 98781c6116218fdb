import math

import pytest
import torch

from bridgevlm.train.optim import (
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    describe_trainable,
)
from toy import ToyLM


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def test_decay_groups_and_part_lrs():
    model = ToyLM()
    model.embed.weight.requires_grad_(False)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, part_lrs={"head.": 5e-4, "he": 1.0})
    groups = _groups(build_optimizer(model, cfg))

    assert set(groups) == {"default:decay", "default:no_decay", "head.:decay", "head.:no_decay"}
    assert groups["default:decay"]["param_names"] == ["mlp.weight"]  # frozen embed left out
    assert groups["default:no_decay"]["param_names"] == [
        "logit_scale", "norm.weight", "norm.bias", "mlp.bias"
    ]
    assert groups["head.:decay"]["param_names"] == ["head.weight"]  # first prefix wins
    assert groups["head.:no_decay"]["param_names"] == ["head.bias"]
    assert groups["default:decay"]["lr"] == 1e-3 and groups["head.:decay"]["lr"] == 5e-4
    assert groups["head.:decay"]["weight_decay"] == 0.1
    assert groups["default:decay"]["weight_decay"] == 0.1
    assert groups["head.:no_decay"]["weight_decay"] == 0.0
    assert groups["default:no_decay"]["weight_decay"] == 0.0
    assert groups["default:decay"]["betas"] == (0.9, 0.999)


def test_optimizer_errors():
    model = ToyLM()
    with pytest.raises(ValueError, match="matches no parameter"):
        build_optimizer(model, OptimConfig(part_lrs={"conector.": 1e-5}))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


def _factors(schedule: ScheduleConfig, total: int, steps: list[int]) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2.0)
    scheduler = build_scheduler(optimizer, schedule, total)
    factors = {}
    for step in range(max(steps) + 1):
        factors[step] = optimizer.param_groups[0]["lr"] / 2.0
        optimizer.step()
        scheduler.step()
    return [factors[s] for s in steps]


def test_schedules_against_hand_computed_values():
    steps = [0, 5, 10, 35, 60, 110]  # warm-up start, mid warm-up, peak, 1/4, 1/2, end of decay
    cosine = ScheduleConfig("cosine", warmup_steps=10, warmup_start_factor=0.1, min_lr_ratio=0.1)
    quarter = 0.5 * (1 + math.cos(math.pi / 4))  # 0.8535533905932737
    assert _factors(cosine, 110, steps) == pytest.approx(
        [0.1, 0.55, 1.0, 0.1 + 0.9 * quarter, 0.55, 0.1], abs=1e-12
    )
    linear = ScheduleConfig("linear", warmup_steps=10, warmup_start_factor=0.1, min_lr_ratio=0.1)
    assert _factors(linear, 110, steps) == pytest.approx(
        [0.1, 0.55, 1.0, 0.775, 0.55, 0.1], abs=1e-12
    )
    constant = ScheduleConfig("constant", warmup_steps=10)
    assert _factors(constant, 110, steps) == pytest.approx([0.0, 0.5, 1, 1, 1, 1], abs=1e-12)


def test_warmup_ratio_and_bad_kind():
    ratio = ScheduleConfig("linear", warmup_ratio=0.1)  # 5 of 50 steps
    assert _factors(ratio, 50, [0, 1, 5, 50]) == pytest.approx([0.0, 0.2, 1.0, 0.0])
    with pytest.raises(ValueError, match="valid: cosine, linear, constant"):
        _factors(ScheduleConfig("cosin"), 10, [0])


def test_describe_trainable():
    model = ToyLM()
    model.embed.requires_grad_(False)
    table = describe_trainable(model)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line[0] != "-"}
    assert rows["embed"][:2] == ["0", "208"]
    assert rows["head"][:2] == ["221", "0"]
    assert rows["(own)"][:2] == ["1", "0"]  # logit_scale
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["total"][:2] == [f"{trainable:,}", "208"]
