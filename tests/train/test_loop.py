import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bridgevlm.train.checkpoint import CheckpointError
from bridgevlm.train.loop import train_stage
from toy import VOCAB, ToyLM, collate, toy_config, toy_dataset


def _train(run_dir, model=None, data=None, **cfg_overrides):
    model = model or ToyLM()
    result = train_stage(model, data or toy_dataset(), collate, toy_config(**cfg_overrides),
                         run_dir, progress=False)
    return model, result


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_accumulation_is_weighted_by_targets(tmp_path):
    data = toy_dataset(32)
    assert len({int(s["mask"].sum()) for s in data}) > 3  # samples differ in target counts
    weights = {}
    for batch_size, accum in [(8, 1), (4, 2), (2, 4)]:
        model, _ = _train(tmp_path / f"b{batch_size}", data=data, batch_size=batch_size,
                          grad_accum=accum, max_steps=6)
        weights[batch_size] = _params(model)
    for batch_size in (4, 2):
        for name, value in weights[8].items():
            torch.testing.assert_close(weights[batch_size][name], value, rtol=0, atol=1e-6,
                                       msg=f"batch {batch_size}: {name}")
    assert not torch.equal(weights[8]["head.weight"], ToyLM().head.weight)


def test_metrics_checkpoints_and_eval(tmp_path):
    model = ToyLM()
    model.embed.requires_grad_(False)
    evals = []

    def eval_fn(m, step):
        assert not m.training
        evals.append(step)
        torch.rand(5)  # must not shift the training RNG stream
        return {"score": step / 10}

    result = train_stage(model, toy_dataset(), collate,
                         toy_config(max_steps=6, log_every=2, eval_every=4, save_every=2,
                                    keep_checkpoints=2),
                         tmp_path, eval_fn=eval_fn, config_to_save={"seed": 0}, progress=False)
    assert model.training
    assert result.steps == 6 and evals == [4, 6]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    for key in ("epoch", "lr", "targets_per_s", "seconds", "data_wait_s", "acc", "grad_norm"):
        assert key in train_lines[0], key
    assert train_lines[0]["epoch"] == 0.5  # 32 samples / batch 8 = 4 steps per epoch
    assert [r for r in lines if "eval/score" in r] == [
        {"step": 4, "eval/score": 0.4}, {"step": 6, "eval/score": 0.6}
    ]
    assert result.final_loss == train_lines[-1]["loss"]

    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000004", "step_00000006"]
    saved = load_file(tmp_path / "checkpoints" / "step_00000006" / "model.safetensors")
    assert "embed.weight" not in saved
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert (tmp_path / "checkpoints" / "step_00000006" / "config.yaml").exists()


def test_loss_goes_down_and_bf16_runs(tmp_path):
    _, result = _train(tmp_path / "fp32", max_steps=40, log_every=10)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.8 * losses[0]
    _, result = _train(tmp_path / "bf16", max_steps=2, precision="bf16")
    assert math.isfinite(result.final_loss)


@pytest.mark.parametrize(
    "batch_size, grad_accum, stop",
    [(4, 2, 5), (8, 1, 8)],  # mid-epoch stop (epoch 1, batch 2 of 8); stop at an epoch boundary
)
def test_resume_is_exact(tmp_path, batch_size, grad_accum, stop):
    kwargs = dict(batch_size=batch_size, grad_accum=grad_accum, max_steps=12, log_every=3)
    whole, _ = _train(tmp_path / "whole", model=ToyLM(dropout=0.2), **kwargs)

    first = train_stage(ToyLM(dropout=0.2), toy_dataset(), collate, toy_config(**kwargs),
                        tmp_path / "split", stop_after_steps=stop, progress=False)
    assert first.steps == stop
    # A fresh process would build the model from scratch: the trainable weights come back
    # from the checkpoint.
    resumed = ToyLM(seed=99, dropout=0.2)
    second = train_stage(resumed, toy_dataset(), collate, toy_config(**kwargs),
                         tmp_path / "split", progress=False)
    assert second.steps == 12

    for name, value in _params(whole).items():
        assert torch.equal(_params(resumed)[name], value), name
    opt_whole = load_file(tmp_path / "whole/checkpoints/step_00000012/optimizer.safetensors")
    opt_split = load_file(tmp_path / "split/checkpoints/step_00000012/optimizer.safetensors")
    assert opt_whole.keys() == opt_split.keys()
    for key in opt_whole:
        assert torch.equal(opt_whole[key], opt_split[key]), key
    assert (json.loads((tmp_path / "whole/checkpoints/step_00000012/optimizer.json").read_text())
            == json.loads((tmp_path / "split/checkpoints/step_00000012/optimizer.json").read_text()))

    # Nothing left to do: a third call is a no-op.
    third = train_stage(resumed, toy_dataset(), collate, toy_config(**kwargs),
                        tmp_path / "split", progress=False)
    assert third.steps == 12 and third.history == []


def test_resume_with_another_layout_is_refused(tmp_path):
    train_stage(ToyLM(), toy_dataset(), collate, toy_config(max_steps=4), tmp_path,
                stop_after_steps=2, progress=False)
    with pytest.raises(CheckpointError, match="batch_size 8 -> 4"):
        train_stage(ToyLM(), toy_dataset(), collate, toy_config(max_steps=4, batch_size=4),
                    tmp_path, progress=False)


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_stage(ToyLM(), [], collate, toy_config(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size 64 is larger"):
        train_stage(ToyLM(), toy_dataset(32), collate, toy_config(batch_size=64), tmp_path,
                    progress=False)


def test_eval_does_not_perturb_training(tmp_path):
    def eval_fn(model, step):
        torch.rand(5)  # draws from the same global generator dropout uses
        return {"n": 1.0}

    plain, _ = _train(tmp_path / "plain", model=ToyLM(dropout=0.3), max_steps=4)
    evaluated = ToyLM(dropout=0.3)
    train_stage(evaluated, toy_dataset(), collate, toy_config(max_steps=4, eval_every=1),
                tmp_path / "eval", eval_fn=eval_fn, progress=False)
    for name, value in _params(plain).items():
        assert torch.equal(_params(evaluated)[name], value), name


class _Grouped(list):
    """The toy data with the lengths/modalities interface: length = the sample's target count."""

    def lengths(self):
        return [int(s["mask"].sum()) for s in self]

    def modalities(self):
        return [0] * len(self)


def test_group_by_length_batches_similar_samples_and_resumes_exactly(tmp_path):
    seen = []

    def recording_collate(samples):
        seen.append(sorted(int(s["mask"].sum()) for s in samples))
        return collate(samples)

    data = _Grouped(toy_dataset(32))
    kwargs = dict(batch_size=4, max_steps=8, group_by_length=True)
    whole = ToyLM()
    train_stage(whole, data, recording_collate, toy_config(**kwargs), tmp_path / "whole", progress=False)
    assert sum(b[-1] - b[0] for b in seen) < sum(b[-1] - b[0] for b in _plain_batches(data, 4, 8))

    train_stage(ToyLM(), data, collate, toy_config(**kwargs), tmp_path / "split", stop_after_steps=3, progress=False)
    resumed = ToyLM(seed=5)
    train_stage(resumed, data, collate, toy_config(**kwargs), tmp_path / "split", progress=False)
    for name, value in _params(whole).items():
        assert torch.equal(_params(resumed)[name], value), name

    with pytest.raises(ValueError, match="group_by_length needs a dataset with lengths"):
        train_stage(ToyLM(), toy_dataset(32), collate, toy_config(**kwargs), tmp_path / "plain", progress=False)


def _plain_batches(data, batch_size, steps):
    from bridgevlm.train.sampler import ResumableSampler
    sampler = ResumableSampler(len(data), seed=0)
    order = sampler.indices()
    lengths = data.lengths()
    return [sorted(lengths[i] for i in order[s * batch_size:(s + 1) * batch_size]) for s in range(steps)]


def test_a_given_sampler_drives_the_data_and_resumes_exactly(tmp_path):
    from torch.utils.data import ConcatDataset

    from bridgevlm.data.mixing import DatasetMix, MixtureSampler

    small, large = toy_dataset(8, seed=1), toy_dataset(40, seed=2)
    data = ConcatDataset([small, large])
    mix = DatasetMix(weights={"small": 3.0}, seed=5, samples_per_epoch=24)

    def sampler():
        return MixtureSampler({"small": len(small), "large": len(large)}, mix)

    seen = []

    def recording_collate(samples):
        seen.extend(samples)
        return collate(samples)

    kwargs = dict(batch_size=4, max_steps=10, log_every=5)
    whole = ToyLM()
    train_stage(whole, data, recording_collate, toy_config(**kwargs), tmp_path / "whole", progress=False,
                sampler=sampler())
    # the loop took exactly the sampler's draws, epoch after epoch (6 batches of 4 per epoch)
    expected = []
    for epoch in range(2):
        draw = sampler()
        draw.set_epoch(epoch)
        expected += [data[i] for i in draw.indices()]
    assert len(seen) == 40
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(seen, expected[:40]))

    train_stage(ToyLM(), data, collate, toy_config(**kwargs), tmp_path / "split", stop_after_steps=7,
                progress=False, sampler=sampler())
    resumed = ToyLM(seed=99)
    train_stage(resumed, data, collate, toy_config(**kwargs), tmp_path / "split", progress=False, sampler=sampler())
    for name, value in _params(whole).items():
        assert torch.equal(_params(resumed)[name], value), name

    with pytest.raises(ValueError, match="cannot reorder a given sampler"):
        train_stage(ToyLM(), data, collate, toy_config(group_by_length=True, **kwargs), tmp_path / "g",
                    progress=False, sampler=sampler())
    other_rank = MixtureSampler({"small": len(small), "large": len(large)}, mix, rank=1, world_size=2)
    with pytest.raises(ValueError, match="built for rank 1 of 2"):
        train_stage(ToyLM(), data, collate, toy_config(**kwargs), tmp_path / "r", progress=False, sampler=other_rank)


class EpochShifted(torch.utils.data.Dataset):
    """Toy samples whose tokens depend on the epoch the dataset was told, as random prefix-LM caption
    splits are drawn per epoch."""

    def __init__(self):
        self.samples, self.epoch, self.told = toy_dataset(), 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.told.append(epoch)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return {**sample, "tokens": (sample["tokens"] + self.epoch) % VOCAB}


def test_a_dataset_drawn_per_epoch_is_told_each_epoch_and_resumes_exactly(tmp_path):
    kwargs = dict(batch_size=8, max_steps=10, log_every=5)  # 4 batches an epoch
    whole, data = ToyLM(), EpochShifted()
    train_stage(whole, data, collate, toy_config(**kwargs), tmp_path / "whole", progress=False)
    assert data.told == [0, 1, 2]
    first, second = EpochShifted(), EpochShifted()
    train_stage(ToyLM(), first, collate, toy_config(**kwargs), tmp_path / "split", stop_after_steps=6, progress=False)
    resumed = ToyLM(seed=99)
    train_stage(resumed, second, collate, toy_config(**kwargs), tmp_path / "split", progress=False)
    assert first.told == [0, 1] and second.told == [1, 2]  # the resumed run starts mid-epoch 1
    for name, value in _params(whole).items():
        assert torch.equal(_params(resumed)[name], value), name
