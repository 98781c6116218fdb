import math

import pytest
import torch
import torch.nn.functional as F

from bridgevlm.data.captions import encode_text, pad_texts
from bridgevlm.models.contrastive import (
    MAX_LOGIT_SCALE,
    ContrastiveModel,
    TinyClipConfig,
    build_tiny_clip,
    contrastive_loss,
    zero_shot_classifier,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = TinyClipConfig(image_size=16, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                      text_hidden=32, text_layers=1, text_heads=2, projection_dim=16, max_text_length=32)


def _info_nce(image, text, scale):
    """Symmetric InfoNCE written out with python floats: mean over rows of -log softmax at the diagonal."""
    n = len(image)
    sim = [[scale * sum(a * b for a, b in zip(image[i], text[j])) for j in range(n)] for i in range(n)]

    def ce(rows):
        return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(rows)) / n

    columns = [[sim[i][j] for i in range(n)] for j in range(n)]
    return (ce(sim) + ce(columns)) / 2


def test_contrastive_loss_by_hand():
    s = 1 / math.sqrt(2)
    image = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [s, 0.0, s]]
    text = [[1.0, 0.0, 0.0], [0.0, s, s], [0.0, 0.0, 1.0]]
    scale = 2.0
    loss = contrastive_loss(torch.tensor(image), torch.tensor(text), torch.tensor(math.log(scale)))
    assert loss.item() == pytest.approx(_info_nce(image, text, scale), abs=1e-6)
    # the image and text directions differ (not symmetric), so both halves matter
    assert _info_nce(image, text, scale) != pytest.approx(_info_nce(text, image, scale) + 1.0)


def test_logit_scale_clamped_at_100():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    at_max = contrastive_loss(image, text, torch.tensor(math.log(100.0)))
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100.0))
    assert contrastive_loss(image, text, torch.tensor(10.0)).item() == pytest.approx(at_max.item(), rel=1e-6)
    assert at_max.item() == pytest.approx(_info_nce(image.tolist(), text.tolist(), 100.0), rel=1e-5)
    below = contrastive_loss(image, text, torch.tensor(math.log(50.0)))
    assert below.item() == pytest.approx(_info_nce(image.tolist(), text.tolist(), 50.0), rel=1e-5)
    assert below.item() != pytest.approx(at_max.item(), rel=1e-3)
    # the clamp stops the gradient: past the clamp the scale does not learn
    scale = torch.tensor(10.0, requires_grad=True)
    contrastive_loss(image, text, scale).backward()
    assert scale.grad.item() == 0.0


@pytest.fixture(scope="module")
def clip(tokenizer):
    torch.manual_seed(0)
    return ContrastiveModel(build_tiny_clip(TINY, tokenizer))


def test_text_features_pool_at_eos(clip, tokenizer):
    texts = [encode_text(tokenizer, t, 32) for t in ("a red circle", "a large blue square at the top left", "hi")]
    ids, mask = pad_texts(texts, tokenizer.pad_token_id)
    assert ids.shape[1] > len(texts[0])  # padding after the EOS of the short rows
    clip.eval()
    with torch.no_grad():
        got = clip.clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        hidden = clip.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, D]
        eos_index = torch.tensor([len(t) - 1 for t in texts])
        assert all(ids[b, eos_index[b]] == tokenizer.eos_token_id for b in range(3))
        expected = clip.clip.text_projection(hidden[torch.arange(3), eos_index])
        # highest-id pooling (HF's legacy eos_token_id == 2 path) would pick another position
        assert not torch.equal(ids.argmax(-1), eos_index)
        wrong = clip.clip.text_projection(hidden[torch.arange(3), ids.argmax(-1)])
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, wrong, atol=1e-3)
    encoded = clip.encode_texts(ids, mask)
    assert torch.allclose(encoded, F.normalize(expected, dim=-1), atol=1e-6)


def _pairs(tokenizer, n=16):
    """16 distinct images (one bright quadrant, a colour) with captions naming the colour and the quadrant."""
    colours = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}
    quadrants = {"top left": (0, 0), "top right": (0, 8), "bottom left": (8, 0), "bottom right": (8, 8)}
    pixels, captions = [], []
    for colour, rgb in colours.items():
        for where, (r, c) in quadrants.items():
            image = torch.full((3, 16, 16), -1.5)
            image[:, r:r + 8, c:c + 8] = torch.tensor(rgb).view(3, 1, 1)
            pixels.append(image)
            captions.append(f"a {colour} square at the {where}")
    ids, mask = pad_texts([encode_text(tokenizer, c, 32) for c in captions], tokenizer.pad_token_id)
    return {"pixel_values": torch.stack(pixels)[:n], "input_ids": ids[:n], "attention_mask": mask[:n]}


def test_tiny_clip_learns(tokenizer):
    torch.manual_seed(0)
    model = ContrastiveModel(build_tiny_clip(TINY, tokenizer)).train()
    batch = _pairs(tokenizer)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        out = model(batch)
        assert int(out.num_targets) == 16
        loss = out.loss_sum / out.num_targets
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[-1] < 0.6 * math.log(16)  # well under chance level, log(16) = 2.77
    assert out.logs["logit_scale"] == pytest.approx(model.clip.logit_scale.exp().item(), rel=0.05)


def test_forward_loss_sum_is_batch_times_mean(clip, tokenizer):
    batch = _pairs(tokenizer, n=4)
    clip.eval()
    with torch.no_grad():
        out = clip(batch)
        images, texts = clip.encode_images(batch["pixel_values"]), clip.encode_texts(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(images.norm(dim=-1), torch.ones(4), atol=1e-5)
    scale = min(clip.clip.logit_scale.exp().item(), 100.0)
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's initial temperature
    assert out.loss_sum.item() == pytest.approx(4 * _info_nce(images.tolist(), texts.tolist(), scale), rel=1e-4)


def test_zero_shot_classifier_rows(clip, tokenizer):
    classes, templates = ["red circle", "blue square", "green star"], ["a photo of a {}.", "a {}"]
    weights = zero_shot_classifier(clip, tokenizer, classes, templates, max_length=32)
    assert weights.shape == (3, TINY.projection_dim)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(3), atol=1e-5)
    # class 1 by hand: mean of its two normalised prompt embeddings, renormalised
    with torch.no_grad():
        prompts = [encode_text(tokenizer, t.format("blue square"), 32) for t in templates]
        embeds = torch.cat([clip.encode_texts(*pad_texts([p], tokenizer.pad_token_id)) for p in prompts])
    assert torch.allclose(weights[1], F.normalize(embeds.mean(0), dim=0), atol=1e-5)


def test_hard_negatives_join_only_the_image_to_text_direction():
    import math

    import torch.nn.functional as F

    from bridgevlm.models.contrastive import contrastive_loss

    torch.manual_seed(0)
    images, texts, hard = (F.normalize(torch.randn(3, 4), dim=-1) for _ in range(3))
    scale = torch.tensor(math.log(10.0))
    present = torch.tensor([True, False, True])
    got = contrastive_loss(images, texts, scale, hard, present)
    # by hand: image i's candidates are all texts plus the hard negatives that are present
    total = 0.0
    for i in range(3):
        candidates = [10 * float(images[i] @ texts[j]) for j in range(3)]
        candidates += [10 * float(images[i] @ hard[j]) for j in range(3) if present[j]]
        total += -candidates[i] + math.log(sum(math.exp(c) for c in candidates))
        column = [10 * float(images[j] @ texts[i]) for j in range(3)]
        total += -column[i] + math.log(sum(math.exp(c) for c in column))
    assert got.item() == pytest.approx(total / 6, rel=1e-5)
    # more present hard negatives can only raise the loss
    assert contrastive_loss(images, texts, scale, hard, torch.ones(3, dtype=torch.bool)) > got
    assert contrastive_loss(images, texts, scale) < got
