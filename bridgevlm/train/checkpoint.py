"""Atomic training checkpoints: safetensors for tensors, JSON/YAML for everything else, no pickle.

A checkpoint directory holds

    model.safetensors        the (trainable) model parameters by name
    optimizer.safetensors    optimiser state tensors, keyed "state.<param_index>.<key>"
    optimizer.json           param_groups and non-tensor state values
    scheduler.json           scheduler.state_dict() without its lr_lambdas (functions)
    rng.safetensors          torch CPU (and CUDA) generator states
    rng.json                 python `random` and numpy generator states
    train_state.json         step, epoch, position in the epoch, ...
    config.yaml              the resolved config, when given

It is written into a sibling `<name>.tmp-<pid>` and renamed into place, so a crash never leaves
a half-written checkpoint under a real name; the parent's `latest` file names the newest one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

MODEL = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER = "scheduler.json"
RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not fit what it is loaded into."""


# ---------------------------------------------------------------------------------------------
# save


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict | None,  # an optimizer, or its (consolidated) state dict
    scheduler: Any | None,
    train_state: dict,
    config: dict | None = None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically to `ckpt_dir`, point `<parent>/latest` at it, and then
    delete all but the newest `keep` checkpoints in the parent (by name order; the loop names
    them `step_<N:08d>`). An existing `ckpt_dir` is replaced."""
    ckpt_dir = Path(ckpt_dir)
    parent = ckpt_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{ckpt_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / MODEL)
    _fsync(tmp / MODEL)
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
        save_file(tensors, tmp / OPTIMIZER_TENSORS)
        _fsync(tmp / OPTIMIZER_TENSORS)
        _write_json(tmp / OPTIMIZER_JSON, meta)
    if scheduler is not None:
        state = scheduler.state_dict()
        state.pop("lr_lambdas", None)  # functions; rebuilt from the config on load
        _write_json(tmp / SCHEDULER, state)
    tensors, meta = _rng_to_files(get_rng_state())
    save_file(tensors, tmp / RNG_TENSORS)
    _fsync(tmp / RNG_TENSORS)
    _write_json(tmp / RNG_JSON, meta)
    if config is not None:
        with open(tmp / CONFIG, "w") as f:
            yaml.safe_dump(_plain(config), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
    _write_json(tmp / TRAIN_STATE, train_state)  # last: its presence marks a complete checkpoint

    if ckpt_dir.exists():
        old = parent / f"{ckpt_dir.name}.old-{os.getpid()}"
        os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, ckpt_dir)
    _fsync_dir(parent)

    latest_tmp = parent / f"{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(ckpt_dir.name + "\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, parent / LATEST)

    if keep is not None and keep > 0:
        for old_ckpt in _complete_checkpoints(parent)[:-keep]:
            if old_ckpt != ckpt_dir:
                shutil.rmtree(old_ckpt)
    return ckpt_dir


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": values}


# ---------------------------------------------------------------------------------------------
# load


def load_checkpoint(
    ckpt_dir: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint; restore `optimizer`, `scheduler` and (unless `restore_rng=False`) the
    python / numpy / torch RNG states in place. Returns `(model_state, train_state)` with the
    model tensors on the CPU."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    train_state = _read_json(ckpt_dir / TRAIN_STATE)
    model_state = _read_tensors(ckpt_dir / MODEL)

    if optimizer is not None:
        meta = _read_json(ckpt_dir / OPTIMIZER_JSON)
        tensors = _read_tensors(ckpt_dir / OPTIMIZER_TENSORS)
        _load_optimizer(optimizer, meta, tensors, ckpt_dir / OPTIMIZER_JSON)
    if scheduler is not None:
        state = _read_json(ckpt_dir / SCHEDULER)
        if hasattr(scheduler, "lr_lambdas"):
            state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
        scheduler.load_state_dict(state)
    if restore_rng:
        meta = _read_json(ckpt_dir / RNG_JSON)
        tensors = _read_tensors(ckpt_dir / RNG_TENSORS)
        try:
            set_rng_state(_rng_from_files(tensors, meta))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"corrupt RNG state in {ckpt_dir}: {e}") from e
    return model_state, train_state


def _load_optimizer(optimizer, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        saved_groups = meta["param_groups"]
        state: dict[int, dict] = {}
        for key, tensor in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = tensor
        for index, values in meta["state"].items():
            state.setdefault(int(index), {}).update(values)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"corrupt optimizer state in {path}: {e}") from e

    current = optimizer.param_groups
    if len(saved_groups) != len(current):
        raise CheckpointError(
            f"{path} has {len(saved_groups)} param groups "
            f"({[g.get('name') for g in saved_groups]}) but the optimizer has {len(current)} "
            f"({[g.get('name') for g in current]}); is the same set of parameters trainable?"
        )
    for saved, group in zip(saved_groups, current):
        saved_names, names = saved.get("param_names"), group.get("param_names")
        if saved_names is not None and names is not None and saved_names != names:
            missing = sorted(set(names) - set(saved_names))[:5]
            extra = sorted(set(saved_names) - set(names))[:5]
            raise CheckpointError(
                f"{path}: param group {group.get('name')!r} was saved for other parameters "
                f"(not in checkpoint: {missing}, only in checkpoint: {extra})"
            )
        for key, value in group.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir` (the one `latest` names, else the
    last complete one by name), or None. Leftover `*.tmp-*` directories are ignored."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return None
    latest = checkpoints_dir / LATEST
    if latest.is_file():
        named = checkpoints_dir / latest.read_text().strip()
        if named.name and _is_complete(named):
            return named
    complete = _complete_checkpoints(checkpoints_dir)
    return complete[-1] if complete else None


def _is_complete(path: Path) -> bool:
    return (
        path.is_dir()
        and ".tmp-" not in path.name
        and ".old-" not in path.name
        and (path / TRAIN_STATE).is_file()
    )


def _complete_checkpoints(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if _is_complete(p))


# ---------------------------------------------------------------------------------------------
# RNG


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states (in memory)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise CheckpointError(
                f"RNG state has {len(state['cuda'])} CUDA generators but "
                f"{torch.cuda.device_count()} devices are visible"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": state["torch"].clone()}
    for i, cuda_state in enumerate(state["cuda"]):
        tensors[f"cuda.{i}"] = cuda_state.cpu().clone()
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def _rng_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    version, internal, gauss = meta["python"]
    name, keys, pos, has_gauss, cached = meta["numpy"]
    num_cuda = sum(1 for k in tensors if k.startswith("cuda."))
    return {
        "python": (version, tuple(internal), gauss),
        "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors["torch"],
        "cuda": [tensors[f"cuda.{i}"] for i in range(num_cuda)],
    }


# ---------------------------------------------------------------------------------------------
# files


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: {e}") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers and sizes
        raise CheckpointError(f"corrupt checkpoint file {path}: {e}") from e


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # not every filesystem lets a directory be fsynced
        pass


def _plain(obj: Any) -> Any:
    """Tuples to lists (recursively) so yaml.safe_dump accepts dataclass-derived configs."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
