"""BLIP-2 stage 1: the three losses and their masks, hard negatives, overfitting a batch, the
frozen tower, and two gloo ranks against one process."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from bridgevlm.models.blip2_pretrain import (Blip2PretrainConfig, QFormerPretrainer, query_text_similarity,
                                             sample_hard_negatives)
from bridgevlm.models.connectors.qformer import QFormer, QFormerConfig, unimodal_attention_mask

QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, num_query_tokens=4, vision_width=24,
               vocab_size=50, max_position_embeddings=16, dropout=0.0, lm_head="tied")
CLS, DEC, NUM_QUERIES = 1, 49, 4
SUBSETS = [dict(zip(("itc", "itm", "itg"), flags))
           for flags in itertools.product([True, False], repeat=3) if any(flags)]
pytestmark = pytest.mark.usefixtures("single_thread")


def build(vision=None, seed: int = 0, layers: int = 2, **objectives) -> QFormerPretrainer:
    torch.manual_seed(seed)
    qformer = QFormer(QFormerConfig(**{**QFORMER, "num_layers": layers}))
    cfg = Blip2PretrainConfig(embed_dim=16, max_text_length=12, dec_token_id=DEC, cls_token_id=CLS, **objectives)
    return QFormerPretrainer(vision, qformer, cfg)


def jittered(model: QFormerPretrainer) -> QFormerPretrainer:
    """Perturb every weight: at BERT's initialisation the image barely moves the text states,
    which would hide a missing dependence below float noise."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "temperature":
                param.add_(torch.randn_like(param) * 0.1)
    return model


def make_batch(size: int = 4, seed: int = 0, length: int = 7) -> dict:
    """Random vision features and right-padded texts of varied lengths, each starting with [CLS]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, DEC, (size, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.arange(size) % (length - 2) + 3
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"vision_features": torch.randn(size, 5, 24, generator=g), "input_ids": ids.masked_fill(mask == 0, 0),
            "attention_mask": mask}


def run(model: QFormerPretrainer, batch: dict, seed: int = 123):
    torch.manual_seed(seed)  # the hard negatives are drawn from the global generator
    return model(batch)


# -- losses and switches --------------------------------------------------------------------------

def test_each_loss_is_finite_logged_and_switchable():
    batch = make_batch()
    full = build().eval()
    out = run(full, batch)
    assert {"loss_itc", "loss_itm", "loss_itg", "temperature"} <= set(out.logs)
    assert all(math.isfinite(out.logs[f"loss_{n}"]) and out.logs[f"loss_{n}"] > 0 for n in ("itc", "itm", "itg"))
    assert int(out.num_targets) == 4
    for objectives in SUBSETS:
        model = build(**objectives).eval()
        model.load_state_dict(full.state_dict())
        part = run(model, batch)
        enabled = [name for name, on in objectives.items() if on]
        assert {k for k in part.logs if k.startswith("loss_")} == {f"loss_{n}" for n in enabled}
        for name in enabled:  # an objective's loss does not depend on which others are on
            assert part.logs[f"loss_{name}"] == pytest.approx(out.logs[f"loss_{name}"], rel=1e-5), (objectives, name)
        # The loop divides by num_targets: the loss sum is the batch size times the sum of the means.
        assert part.loss_sum.item() == pytest.approx(4 * sum(part.logs[f"loss_{n}"] for n in enabled), rel=1e-5)
    with pytest.raises(ValueError, match="at least one objective"):
        Blip2PretrainConfig(itc=False, itm=False, itg=False)
    with pytest.raises(ValueError, match="LM head"):
        QFormerPretrainer(None, QFormer(QFormerConfig(**{**QFORMER, "lm_head": "none"})), Blip2PretrainConfig())


@pytest.mark.parametrize("objectives", SUBSETS, ids=lambda o: "+".join(k for k, v in o.items() if v))
def test_every_trainable_parameter_gets_a_gradient(objectives):
    """DDP without find_unused_parameters needs it; a 3-layer Q-Former has cross-attention in its last layer."""
    model = build(layers=3, **objectives)
    run(model, make_batch()).loss_sum.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.itm_head.weight.requires_grad == objectives["itm"]
    assert model.temperature.requires_grad == objectives["itc"]


def test_texts_are_checked_and_cut():
    model = build().eval()
    batch = make_batch()
    batch["input_ids"][2, 0] = 7
    with pytest.raises(ValueError, match="text 2 .* starts with token 7, not \\[CLS\\]"):
        model(batch)
    long = make_batch(length=15)
    long["attention_mask"][:] = 1  # 15 real tokens: the last 3 are cut (max_text_length 12)
    long["input_ids"][:, 1:] = torch.randint(2, DEC, (4, 14))
    cut = {**long, "input_ids": long["input_ids"][:, :12], "attention_mask": long["attention_mask"][:, :12]}
    assert run(model, long).loss_sum.item() == pytest.approx(run(model, cut).loss_sum.item(), rel=1e-6)


# -- masks ----------------------------------------------------------------------------------------

@torch.no_grad()
def test_itc_uses_the_unimodal_view_and_the_max_over_queries():
    model = jittered(build()).eval()
    batch, other = make_batch(), make_batch(seed=1)
    ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
    text = model.encode_text(ids, mask)
    images = model.encode_image(features)
    for vision in (features, other["vision_features"]):  # the text never sees the image ...
        joint = model.qformer(vision, ids, unimodal_attention_mask(NUM_QUERIES, mask))
        assert torch.allclose(F.normalize(model.text_proj(joint.text[:, 0]), dim=-1), text, atol=1e-5)
    joint = model.qformer(features, other["input_ids"], unimodal_attention_mask(NUM_QUERIES, other["attention_mask"]))
    # ... nor the queries the text
    assert torch.allclose(F.normalize(model.vision_proj(joint.queries), dim=-1), images, atol=1e-5)
    # loss: symmetric cross-entropy over sim[i, j] = max_q image_i,q . text_j / temperature
    sim = torch.stack([torch.stack([(images[i] @ text[j]).max() for j in range(4)]) for i in range(4)]) / 0.07
    assert torch.allclose(query_text_similarity(images, text) / 0.07, sim, atol=1e-5)
    targets = torch.arange(4)
    expected = (F.cross_entropy(sim, targets, label_smoothing=0.1)
                + F.cross_entropy(sim.t(), targets, label_smoothing=0.1)) / 2
    itc_only = build(itm=False, itg=False).eval()
    itc_only.load_state_dict(model.state_dict())
    assert itc_only(batch).logs["loss_itc"] == pytest.approx(expected.item(), rel=1e-5)


@torch.no_grad()
def test_itg_text_sees_the_image_and_earlier_text_only():
    model = jittered(build()).eval()
    batch = make_batch(length=8)
    batch["attention_mask"][:] = 1
    batch["input_ids"] = torch.randint(2, DEC, (4, 8))
    batch["input_ids"][:, 0] = CLS
    ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
    logits = model.caption_logits(features, ids, mask)
    later = ids.clone()
    later[:, 4:] = torch.randint(2, DEC, (4, 4))
    changed = model.caption_logits(features, later, mask)
    assert torch.allclose(changed[:, :4], logits[:, :4], atol=1e-5)  # position i ignores tokens after it
    assert not torch.allclose(changed[:, 4:], logits[:, 4:], atol=1e-3)
    other_image = model.caption_logits(make_batch(seed=1)["vision_features"], ids, mask)
    assert ((other_image - logits).abs().amax(dim=-1) > 1e-3).all()  # every position sees the image
    first = ids.clone()
    first[:, 0] = 9  # the first token is replaced by [DEC]
    assert torch.allclose(model.caption_logits(features, first, mask), logits, atol=1e-6)
    # loss: next-token cross-entropy, padding ignored
    padded = make_batch()
    logits = model.caption_logits(padded["vision_features"], padded["input_ids"], padded["attention_mask"])
    keep = padded["attention_mask"][:, 1:].bool()
    expected = F.cross_entropy(logits[:, :-1][keep], padded["input_ids"][:, 1:][keep], label_smoothing=0.1)
    itg_only = build(itc=False, itm=False).eval()
    itg_only.load_state_dict(model.state_dict())
    assert itg_only(padded).logs["loss_itg"] == pytest.approx(expected.item(), rel=1e-5)


@torch.no_grad()
def test_itm_queries_see_both_image_and_text():
    model = jittered(build()).eval()
    batch = make_batch()
    ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
    logits = model.match_logits(features, ids, mask)
    assert logits.shape == (4, 2)
    assert ((model.match_logits(make_batch(seed=1)["vision_features"], ids, mask) - logits).abs().amax(1) > 1e-3).all()
    last = mask.sum(1) - 1
    text = ids.clone()
    text[torch.arange(4), last] = (text[torch.arange(4), last] + 1 - 2) % (DEC - 2) + 2
    assert ((model.match_logits(features, text, mask) - logits).abs().amax(1) > 1e-3).all()
    padding = ids.masked_fill(mask == 0, 33)  # tokens under padding are never seen
    assert torch.allclose(model.match_logits(features, padding, mask), logits, atol=1e-5)


# -- hard negatives -------------------------------------------------------------------------------

def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        rows = int(torch.randint(1, 7, (), generator=g))
        columns = rows + int(torch.randint(0, 4, (), generator=g))
        kind = trial % 4
        if kind == 0:
            sim = torch.randn(rows, columns, generator=g) * 5
        elif kind == 1:  # ties everywhere
            sim = torch.randint(0, 2, (rows, columns), generator=g).float()
        elif kind == 2:  # a dominant positive
            sim = torch.randn(rows, columns, generator=g) + 1e4 * torch.eye(rows, columns)
        else:  # excluded columns (-inf)
            sim = torch.randn(rows, columns, generator=g).masked_fill(torch.rand(rows, columns, generator=g) < 0.3,
                                                                      float("-inf"))
        positives = torch.eye(rows, columns, dtype=torch.bool)
        if trial % 3 == 0:  # duplicates of the positive
            positives |= torch.rand(rows, columns, generator=g) < 0.3
        chosen = sample_hard_negatives(sim, g, None if trial % 3 == 1 else positives)  # None: the diagonal
        allowed = ~positives & (sim > float("-inf"))
        for row, col in enumerate(chosen.tolist()):
            if allowed[row].any():
                assert col >= 0 and allowed[row, col], (trial, row, col)
            else:
                assert col == -1, (trial, row)
    assert sample_hard_negatives(torch.tensor([[3.0]]), g).tolist() == [-1]  # a batch of one
    assert sample_hard_negatives(torch.zeros(2, 2), g, torch.ones(2, 2, dtype=torch.bool)).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="NaN"):
        sample_hard_negatives(torch.tensor([[0.0, float("nan")]]), g)


def test_hard_negatives_follow_softmax_of_the_similarity():
    sim = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0], [0.0, 9.0, 1.0, 1.0, 2.0],
                        [1.5, 1.5, 1.5, 1.5, 1.5], [-2.0, 0.0, 3.0, 0.5, 0.2]])
    draws = 4000
    chosen = sample_hard_negatives(sim.repeat(draws, 1), torch.Generator().manual_seed(0),
                                   torch.eye(4, 5, dtype=torch.bool).repeat(draws, 1)).view(draws, 4)
    for row in range(4):
        counts = torch.bincount(chosen[:, row], minlength=5).float()
        assert counts[row] == 0
        expected = torch.softmax(sim[row].masked_fill(torch.arange(5) == row, float("-inf")), 0) * draws
        keep = torch.arange(5) != row
        chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
        assert chi2 < 16.27, (row, counts, expected)  # chi-square, 3 degrees of freedom, p = 0.001


def test_identical_captions_and_images_are_never_negatives():
    model = build(itc=False, itg=False).eval()
    batch = make_batch()
    batch["input_ids"][1] = batch["input_ids"][0]  # samples 0 and 1: one caption
    batch["attention_mask"][1] = batch["attention_mask"][0]
    batch["image_ids"] = torch.tensor([0, 1, 2, 2])  # samples 2 and 3: one image
    pairs = []
    original = model.match_logits

    def record(features, ids, mask):
        pairs.append((features, ids))
        return original(features, ids, mask)

    def index(row: torch.Tensor, rows: torch.Tensor) -> set[int]:
        return {i for i in range(len(rows)) if torch.equal(row, rows[i])}

    model.match_logits = record
    for seed in range(20):
        pairs.clear()
        run(model, batch, seed)
        features, ids = pairs[0]
        assert len(ids) == 4 + 4 + 4  # matched pairs, then texts with a negative image, images with a negative text
        for features_row, ids_row in zip(features[4:], ids[4:]):
            image, texts = index(features_row, batch["vision_features"]), index(ids_row, batch["input_ids"])
            assert not ({0, 1} >= image | texts or {2, 3} >= image | texts), seed
    same = make_batch()  # every caption identical: no negative exists, only the matched pairs remain
    same["input_ids"][:], same["attention_mask"][:] = same["input_ids"][0], same["attention_mask"][0]
    pairs.clear()
    assert math.isfinite(run(model, same).logs["loss_itm"]) and len(pairs[0][1]) == 4


# -- training -------------------------------------------------------------------------------------

def test_a_few_steps_overfit_a_fixed_batch():
    model = build()
    batch = make_batch()
    before = run(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step in range(25):
        out = run(model, batch, seed=step)
        optimizer.zero_grad()
        (out.loss_sum / out.num_targets).backward()
        optimizer.step()
    after = run(model, batch)
    assert after.loss_sum.item() < 0.6 * before.loss_sum.item()
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert after.logs[name] < before.logs[name], name


def tiny_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from bridgevlm.models.vision import VisionTower

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=2))
    return VisionTower(clip, feature_layer=-2, select="patch")


def test_vision_tower_stays_frozen_and_cached_features_give_the_same_loss():
    tower = tiny_tower()
    model = build(vision=tower).train()
    assert not model.vision.training and not any(p.requires_grad for p in model.vision.parameters())
    batch = make_batch(size=3)
    pixels = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": batch["input_ids"],
              "attention_mask": batch["attention_mask"]}
    out = run(model, pixels)
    out.loss_sum.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.qformer.query_tokens.grad.abs().sum() > 0
    with torch.no_grad():
        features = tower(pixels["pixel_values"])
    cached = {**pixels, "vision_features": features}
    del cached["pixel_values"]
    assert run(model, cached).loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-6)
    with pytest.raises(ValueError, match="vision_features, or pixel_values"):
        build()(pixels)


# -- two ranks ------------------------------------------------------------------------------------

RANK_ROWS = (slice(0, 3), slice(3, 4))  # unequal shares: 3 samples on rank 0, 1 on rank 1


def _rank_batch(rank: int) -> dict:
    batch = make_batch(size=4, length=7)
    local = {key: value[RANK_ROWS[rank]] for key, value in batch.items()}
    width = int(local["attention_mask"].sum(1).max())  # ranks pad their texts to different widths
    local["input_ids"], local["attention_mask"] = local["input_ids"][:, :width], local["attention_mask"][:, :width]
    return local


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch = _rank_batch(rank)
        model = build(itm=False, itg=False)
        out = model(batch)
        out.loss_sum.backward()
        loss_sum = out.loss_sum.detach().clone()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for tensor in [loss_sum, *grads.values()]:  # what the loop's DDP step adds up
            tdist.all_reduce(tensor)
        # With every objective on, ITM draws negatives from the other rank's samples as well.
        full = build()
        everything = full({**batch, "image_ids": torch.arange(4)[RANK_ROWS[rank]]})
        everything.loss_sum.backward()
        if rank == 0:
            torch.save({"loss_sum": loss_sum, "grads": grads, "logs": everything.logs}, out_file)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_match_one_process_on_itc(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "ranks.pt")), nprocs=2)
    ranks = torch.load(tmp_path / "ranks.pt")
    model = build(itm=False, itg=False)
    out = model(make_batch(size=4, length=7))
    out.loss_sum.backward()
    assert ranks["loss_sum"].item() == pytest.approx(out.loss_sum.item(), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ranks["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-3, atol=2e-5, msg=name)
    assert all(math.isfinite(ranks["logs"][f"loss_{n}"]) for n in ("itc", "itm", "itg"))
