"""Run under torchrun: train the toy model with DDP (or FSDP) and save the final weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/ddp_worker.py OUTDIR [ddp|fsdp]
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # the repo root (bridgevlm) and toy.py

from safetensors.torch import save_file  # noqa: E402

from bridgevlm.train.distributed import cleanup, init_distributed  # noqa: E402
from bridgevlm.train.loop import train_stage  # noqa: E402
from toy import DDP_SETTINGS, ToyLM, collate, toy_config, toy_dataset  # noqa: E402


def main(out_dir: Path, strategy: str) -> None:
    dist = init_distributed()
    model = ToyLM()
    # Per-rank batch is half the single-process one: the same global batches.
    cfg = toy_config(**{**DDP_SETTINGS, "batch_size": DDP_SETTINGS["batch_size"] // 2, "distributed": strategy})
    result = train_stage(model, toy_dataset(), collate, cfg, out_dir / "run", dist=dist,
                         progress=False)
    if dist.is_main:
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        save_file(weights, out_dir / "weights.safetensors",
                  metadata={"steps": str(result.steps), "loss": repr(result.final_loss)})
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
