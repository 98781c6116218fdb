import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridgevlm.train.checkpoint import load_checkpoint
from bridgevlm.train.distributed import DistContext, all_reduce_sum, barrier, init_distributed
from bridgevlm.train.loop import train_stage
from toy import DDP_SETTINGS, ToyLM, collate, toy_config, toy_dataset

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (0, 1, 0, True)
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    barrier()
    assert not DistContext(rank=1, world_size=2).is_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_single_process(tmp_path, strategy):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(WORKER), str(tmp_path / "ddp"), strategy]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = load_file(tmp_path / "ddp" / "weights.safetensors")

    model = ToyLM()
    result = train_stage(model, toy_dataset(), collate, toy_config(**DDP_SETTINGS),
                         tmp_path / "single", dist=DistContext(), progress=False)  # CPU too
    assert result.steps == DDP_SETTINGS["max_steps"]
    assert set(ddp) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ddp["head.weight"], ToyLM().head.weight)  # it did train
    # The logged losses are reduced over ranks, so they match the single process too.
    ddp_lines = (tmp_path / "ddp" / "run" / "metrics.jsonl").read_text().splitlines()
    ddp_losses = [json.loads(line)["loss"] for line in ddp_lines]
    assert ddp_losses == pytest.approx([r["loss"] for r in result.history], rel=1e-5)
    # The last checkpoint holds full (consolidated) tensors: any world size loads it, this process too.
    last = tmp_path / "ddp" / "run" / "checkpoints" / f"step_{DDP_SETTINGS['max_steps']:08d}"
    state, saved = load_checkpoint(last, restore_rng=False)
    assert saved["world_size"] == 2
    for name, param in model.named_parameters():
        torch.testing.assert_close(state[name], param.detach(), rtol=1e-5, atol=1e-6, msg=name)
