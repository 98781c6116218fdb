import json
import random

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bridgevlm.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from bridgevlm.train.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler
from toy import ToyLM, collate, toy_dataset


def _trained(steps: int = 3):
    model = ToyLM()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_steps=2), total_steps=10)
    batch = collate(toy_dataset(8))
    for _ in range(steps):
        model(batch).loss_sum.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _save(path, model, optimizer, scheduler, step=3, **kwargs):
    return save_checkpoint(
        path,
        model_state=dict(model.named_parameters()),
        optimizer=optimizer,
        scheduler=scheduler,
        train_state={"step": step},
        **kwargs,
    )


def _draws():
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_roundtrip_restores_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _trained()
    _save(tmp_path / "ckpt" / "step_3", model, optimizer, scheduler,
          config={"optim": {"betas": (0.9, 0.99)}})
    expected_draws = _draws()

    fresh = ToyLM(seed=1)
    fresh_opt = build_optimizer(fresh, OptimConfig(lr=1e-2, weight_decay=0.1))
    fresh_sched = build_scheduler(fresh_opt, ScheduleConfig(warmup_steps=2), total_steps=10)
    model_state, train_state = load_checkpoint(tmp_path / "ckpt" / "step_3", fresh_opt, fresh_sched)

    assert _draws() == expected_draws
    assert train_state == {"step": 3}
    for name, param in model.named_parameters():
        assert torch.equal(model_state[name], param.detach())
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_files_hold_no_pickle(tmp_path):
    model, optimizer, scheduler = _trained()
    ckpt = _save(tmp_path / "step_3", model, optimizer, scheduler, config={"a": [1, 2]})
    for path in ckpt.iterdir():
        if path.suffix == ".safetensors":
            assert load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".yaml"
            assert yaml.safe_load(path.read_text()) == {"a": [1, 2]}
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "optimizer.json",
                     "scheduler.json", "rng.safetensors", "rng.json", "train_state.json",
                     "config.yaml"}
    assert (tmp_path / "latest").read_text().strip() == "step_3"


def test_leftover_tmp_dir_is_ignored(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    model, optimizer, scheduler = _trained(1)
    _save(tmp_path / "step_00000002", model, optimizer, scheduler)
    # A crash mid-save leaves a tmp dir that may even look complete.
    leftover = tmp_path / "step_00000004.tmp-999"
    leftover.mkdir()
    (leftover / "train_state.json").write_text('{"step": 4}')
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    (tmp_path / "latest").unlink()  # without the pointer, the last complete one by name
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_keep_prunes_older_and_resave_replaces(tmp_path):
    model, optimizer, scheduler = _trained(1)
    for step in range(1, 5):
        _save(tmp_path / f"step_{step:08d}", model, optimizer, scheduler, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003",
                                                          "step_00000004"]
    _save(tmp_path / "step_00000004", model, optimizer, scheduler, step=44, keep=2)
    assert json.loads((tmp_path / "step_00000004" / "train_state.json").read_text()) == {
        "step": 44
    }
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"


def test_missing_or_corrupt_file_names_the_path(tmp_path):
    model, optimizer, scheduler = _trained(1)
    ckpt = _save(tmp_path / "step_1", model, optimizer, scheduler)
    (ckpt / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt.*optimizer.safetensors"):
        load_checkpoint(ckpt, optimizer)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*model.safetensors"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "step_2")


def test_optimizer_for_other_parameters_is_refused(tmp_path):
    model, optimizer, scheduler = _trained(1)
    ckpt = _save(tmp_path / "step_1", model, optimizer, scheduler)
    other = ToyLM()
    other.mlp.requires_grad_(False)
    other_opt = build_optimizer(other, OptimConfig(weight_decay=0.1))
    with pytest.raises(CheckpointError, match="saved for other parameters"):
        load_checkpoint(ckpt, other_opt)
