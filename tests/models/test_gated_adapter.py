"""CROME's gated cross-modal adapter: its math and size, how the LLM's input is made from its two
branches, generation, and saving a stage that trained only the adapter."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from bridgevlm.config import from_dict
from bridgevlm.data.conversations import ConversationDataset, ImageSource, PadCollator
from bridgevlm.data.prefix_lm import tokenize_source
from bridgevlm.data.templates import get_template
from bridgevlm.infer.generate import GenerationConfig, generate
from bridgevlm.infer.pipeline import answer, prepare_prompts
from bridgevlm.models.assemble import VlmConfig, VlmLoadError, build_vlm, load_vlm, save_vlm
from bridgevlm.models.connectors import GatedAdapterConfig, GatedCrossModalAdapter
from bridgevlm.models.connectors.gated_adapter import adapter_parameter_count
from bridgevlm.models.lora import LoraSettings
from bridgevlm.train.optim import OptimConfig, build_optimizer
from bridgevlm.train.trainability import Trainability, apply_trainability

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# The adapter alone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
def test_each_branch_computes_x_plus_its_gated_bottleneck_through_the_shared_up_projection(activation):
    torch.manual_seed(0)
    d, m = 6, 3
    adapter = GatedCrossModalAdapter(d, GatedAdapterConfig(bottleneck=m, activation=activation))
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_()
    x = torch.randn(2, 4, d)
    w_u = adapter.w_u.weight.T.tolist()  # [m][d]; nn.Linear stores W^T
    for branch in ("text", "vision"):
        w_d = getattr(adapter, branch).w_d.weight.T.tolist()  # [d][m]
        w_g = getattr(adapter, branch).w_g.weight.T.tolist()
        out = adapter(x, branch)
        for b in range(2):
            for t in range(4):
                row = x[b, t].tolist()
                z = []
                for j in range(m):
                    a = sum(row[i] * w_d[i][j] for i in range(d))
                    g = sum(row[i] * w_g[i][j] for i in range(d))
                    sigmoid = 1 / (1 + math.exp(-a))
                    act = a * sigmoid if activation == "silu" else sigmoid
                    z.append(act * g)
                expected = [row[k] + sum(z[j] * w_u[j][k] for j in range(m)) for k in range(d)]
                assert out[b, t].tolist() == pytest.approx(expected, abs=1e-5), (branch, b, t)
    assert not torch.allclose(adapter(x, "text"), adapter(x, "vision"))  # modality-specific down-projections


def test_the_adapter_starts_as_the_identity_and_rejects_an_unknown_branch():
    adapter = GatedCrossModalAdapter(8, GatedAdapterConfig(bottleneck=2))
    x = torch.randn(3, 8)
    assert torch.equal(adapter(x, "text"), x) and torch.equal(adapter(x, "vision"), x)
    with pytest.raises(ValueError, match="unknown adapter branch 'audio'; valid: text, vision"):
        adapter(x, "audio")


@pytest.mark.parametrize("width,bottleneck", [(4096, 256), (128, 32), (6, 3)])
def test_the_adapter_has_five_d_m_weights(width, bottleneck):
    adapter = GatedCrossModalAdapter(width, GatedAdapterConfig(bottleneck=bottleneck))
    shapes = {name: tuple(p.shape) for name, p in adapter.named_parameters()}
    assert shapes == {"text.w_d.weight": (bottleneck, width), "text.w_g.weight": (bottleneck, width),
                      "vision.w_d.weight": (bottleneck, width), "vision.w_g.weight": (bottleneck, width),
                      "w_u.weight": (width, bottleneck)}  # no biases; one W_u for both branches
    assert sum(p.numel() for p in adapter.parameters()) == adapter_parameter_count(width, bottleneck) \
        == 5 * width * bottleneck
    assert adapter_parameter_count(4096, GatedAdapterConfig().bottleneck) == 5_242_880  # ≈ the paper's 5M


def test_bad_adapter_settings_name_the_field():
    with pytest.raises(ValueError, match="unknown connector.adapter.activation 'relu'; valid: silu, sigmoid"):
        GatedAdapterConfig(activation="relu")
    with pytest.raises(ValueError, match="connector.adapter.bottleneck must be >= 1"):
        GatedAdapterConfig(bottleneck=0)


# ------------------------------------------------------------------------------------------------
# In a VisionLanguageModel
# ------------------------------------------------------------------------------------------------

def _config(qformer_parts, text_input: bool = True) -> VlmConfig:
    connector = {**qformer_parts["connector"], "kind": "gated_adapter", "qformer": {"text_input": text_input},
                 "adapter": {"bottleneck": 4}}
    return from_dict(VlmConfig, {**qformer_parts, "connector": connector})


@pytest.fixture()
def gated(qformer_parts):
    torch.manual_seed(0)
    return build_vlm(_config(qformer_parts))


def _perturb(params, std: float = 0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * std)


def _images(tmp_path):
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
    return [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(2)]


RECORDS = [
    {"id": "img0", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                     {"from": "gpt", "value": "red"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    {"id": "img1", "image": "1.png", "conversations": [{"from": "human", "value": "What colour is it?\n<image>"},
                                                     {"from": "gpt", "value": "blue"}]},
]


def _batch(loaded, tmp_path):
    _images(tmp_path)
    source = ImageSource(tmp_path, loaded.processor, loaded.placeholder)
    data = ConversationDataset(RECORDS, loaded.tokenizer, get_template("vicuna_v1"), 256, images=source)
    return PadCollator(loaded.tokenizer.pad_token_id, loaded.processor)([data[i] for i in range(len(data))])


def _logits(model, batch):
    with torch.no_grad():
        return model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])


def test_the_llm_reads_its_own_text_then_each_images_adapted_turn_copy_then_its_adapted_queries(gated, tmp_path):
    model = gated.model.eval()
    assert {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("connector.")} == {
        "visual", "adapter"}
    offset = model.text_copy_offset
    assert offset == model.llm.model.get_input_embeddings().num_embeddings > model.image_token_id
    _perturb(model.connector.adapter.parameters())
    batch = _batch(gated, tmp_path)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    is_image, is_copy = ids == model.image_token_id, ids >= offset
    # concat(text, adapted text, adapted image): each image's run of queries follows its turn's copy
    for row, sample in ((0, "img0"), (2, "img1")):
        first_image = int(is_image[row].nonzero()[0])
        copy = is_copy[row].nonzero().flatten()
        assert len(copy) > 3 and int(copy[-1]) == first_image - 1 and torch.equal(copy, copy.sort().values), sample
        turn = [int(i) for i, c, im, m in zip(ids[row], is_copy[row], is_image[row], batch["attention_mask"][row])
                if m and not c and not im and int(i) != gated.tokenizer.bos_token_id]
        assert [int(i) - offset for i in ids[row, copy]] == turn[:len(copy)], sample  # the user turn, as rendered
    assert not is_copy[1].any()  # a text-only sample has no image, so no copy
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        adapter = model.connector.adapter
        plain = ~is_image & ~is_copy
        assert torch.equal(embeds[plain], model.llm.embed(ids[plain]))
        copied = model.llm.embed(ids[is_copy] - offset)
        assert torch.equal(embeds[is_copy], adapter(copied, "text"))
        assert not torch.allclose(embeds[is_copy], copied)  # the branch does act
        visual = adapter(model.connector.visual(model.vision(pixels)), "vision")  # [I, Q, D]
        assert torch.equal(embeds[is_image], visual.reshape(-1, visual.shape[-1]))


def test_a_text_only_prompt_is_exactly_the_base_llms_whatever_the_adapter_learnt(gated, tmp_path):
    model = gated.model.eval()
    batch = _batch(gated, tmp_path)
    ids, mask = batch["input_ids"][1:2], batch["attention_mask"][1:2]  # the text-only sample
    _perturb(model.connector.adapter.parameters())
    with torch.no_grad():
        assert torch.equal(model.logits(ids, mask), model.llm.model(input_ids=ids, attention_mask=mask).logits)
    # ... yet the text branch stays in the graph with a zero gradient: under DDP every rank must reach it
    model.logits(ids, mask).sum().backward()
    for name, param in model.connector.adapter.text.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


def _conversations():
    return [[{"from": "human", "value": "<image>\nWhat colour?"}],
            [{"from": "human", "value": "Say hello to the quick brown fox."}],
            [{"from": "human", "value": "What colour is the large circle at the top left?\n<image>"}]]


def test_batched_generation_equals_one_at_a_time_and_equals_a_full_forward_per_token(gated, tmp_path):
    model = gated.model.eval()
    _perturb(model.connector.adapter.parameters(), std=0.5)
    _perturb(model.llm.parameters(), std=0.2)  # an untrained tiny LLM repeats one token whatever it reads
    red, blue = _images(tmp_path)
    conversations, images = _conversations(), [[red], [], [blue]]
    for cfg in (GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=6, num_beams=3)):
        batched = answer(gated, conversations, images, cfg, batch_size=3)
        alone = [answer(gated, [c], [i], cfg, batch_size=1)[0] for c, i in zip(conversations, images)]
        assert batched == alone, cfg
    # New tokens are plain text: the KV-cached loop equals re-running the whole sequence each step.
    template = get_template(gated.config.template, gated.tokenizer)
    batch = prepare_prompts(gated, template, conversations[:1], images[:1])
    instructions = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask")}
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], **instructions)
        steps = 6
        cached = generate(model.llm.model, embeds, batch["attention_mask"], GenerationConfig(max_new_tokens=steps),
                          None).tokens[0]
        ids, mask, reference = batch["input_ids"], batch["attention_mask"], []
        for _ in range(steps):
            token = model.logits(ids, mask, batch["pixel_values"], **instructions)[0, -1].argmax().item()
            reference.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    assert cached == reference


def test_an_encoder_decoder_llm_reads_the_copy_and_the_image_in_its_encoder(qformer_parts, t5_parts, tmp_path):
    loaded = build_vlm(_config({**t5_parts, "vision": qformer_parts["vision"],
                                "connector": qformer_parts["connector"]}, text_input=False))
    model = loaded.model.eval()
    _perturb(model.connector.adapter.parameters())
    ids = torch.tensor([tokenize_source(loaded.tokenizer, "<image>Question: what colour? Answer:", loaded.placeholder)])
    is_copy = ids >= model.text_copy_offset
    assert is_copy.sum() > 3 and (ids == model.image_token_id).sum() == model.num_image_tokens
    pixels = loaded.processor.batch(_images(tmp_path)[:1])
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        assert torch.equal(embeds[is_copy], model.connector.adapter(model.llm.embed(ids[is_copy] - model.text_copy_offset),
                                                                    "text"))
        logits = model.logits(ids, torch.ones_like(ids), pixels, decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert logits.shape[:2] == (1, 2) and torch.isfinite(logits).all()


def test_a_saved_gated_adapter_model_reloads_to_identical_logits(gated, tmp_path):
    _perturb(gated.model.connector.parameters(), std=0.05)
    batch = _batch(gated, tmp_path)
    reference = _logits(gated.model.eval(), batch)
    save_vlm(gated, tmp_path / "model")
    saved = load_file(tmp_path / "model/weights.safetensors")
    assert set(saved) == {f"connector.{n}" for n, _ in gated.model.connector.named_parameters()}
    again = load_vlm(tmp_path / "model")
    assert again.qformer_tokenizer is not None and again.instruction_tokenizer() is not None
    assert torch.equal(_logits(again.model.eval(), batch), reference)


# ------------------------------------------------------------------------------------------------
# Training a part of the connector
# ------------------------------------------------------------------------------------------------

def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_connector_parts_choose_what_of_the_connector_trains(gated):
    model = gated.model
    names = {name for name, _ in model.named_parameters()}
    adapter = {n for n in names if n.startswith("connector.adapter.")}
    projection = {n for n in names if n.startswith("connector.visual.language_projection.")}
    assert len(adapter) == 5 and len(projection) == 2
    apply_trainability(model, Trainability(connector_parts=["adapter"]), LoraSettings())
    assert _trainable(model) == adapter and model.connector_parts == ["adapter"]
    apply_trainability(model, Trainability(connector_parts=["visual.language_projection", "adapter"]), LoraSettings())
    assert _trainable(model) == adapter | projection
    apply_trainability(model, Trainability(), LoraSettings())  # the whole bridge
    assert _trainable(model) == {n for n in names if n.startswith("connector.")} and model.connector_parts == []
    with pytest.raises(ValueError, match=r"trainable.connector_parts: 'adaptr' matches no parameter of the "
                                         r"GatedAdapterConnector; its parts: adapter, adapter.text, .*visual.qformer"):
        apply_trainability(model, Trainability(connector_parts=["adaptr"]), LoraSettings())
    with pytest.raises(ValueError, match="trainable.connector is 'frozen'; set it to full"):
        apply_trainability(model, Trainability(connector="frozen", connector_parts=["adapter"]), LoraSettings())


def test_an_adapter_only_stage_trains_exactly_the_adapter_and_saves_only_it(gated, tmp_path):
    save_vlm(gated, tmp_path / "run/02_instruct/model")  # the stage it starts from: a whole connector
    loaded = load_vlm(tmp_path / "run/02_instruct/model")
    model = loaded.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    apply_trainability(model, Trainability(connector_parts=["adapter"]), LoraSettings())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.05))
    batch = _batch(loaded, tmp_path)
    model.train()
    for _ in range(3):
        out = model(batch)
        (out.loss_sum / out.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("connector.adapter.")}  # the rest bit-identical
    reference = _logits(model.eval(), batch)

    save_vlm(loaded, tmp_path / "run/03_task/model")
    saved = load_file(tmp_path / "run/03_task/model/weights.safetensors")
    assert set(saved) == changed  # only connector.adapter.*
    meta = yaml.safe_load((tmp_path / "run/03_task/model/vlm.yaml").read_text())
    assert meta["base"] == "../../02_instruct/model" and meta["connector_parts"] == ["adapter"]
    again = load_vlm(tmp_path / "run/03_task/model")
    assert torch.equal(_logits(again.model.eval(), batch), reference)
    assert again.model.connector_parts == [] and again.directory == tmp_path / "run/03_task/model"

    (tmp_path / "run").rename(tmp_path / "moved")  # a run directory moves as a whole
    assert torch.equal(_logits(load_vlm(tmp_path / "moved/03_task/model").model.eval(), batch), reference)
    (tmp_path / "moved/02_instruct").rename(tmp_path / "elsewhere")
    with pytest.raises(VlmLoadError, match=r"holds only the connector parts \['adapter'\] its stage trained, on top "
                                           r"of the model in .*02_instruct/model, which is missing"):
        load_vlm(tmp_path / "moved/03_task/model")


def test_a_stage_started_fresh_saves_its_whole_connector_even_when_it_trains_a_part(gated, tmp_path):
    apply_trainability(gated.model, Trainability(connector_parts=["visual.language_projection", "adapter"]),
                       LoraSettings())
    save_vlm(gated, tmp_path / "model")  # built, not loaded: the Q-Former is in no saved directory yet
    saved = load_file(tmp_path / "model/weights.safetensors")
    assert any(name.startswith("connector.visual.qformer.") for name in saved)
    assert "base" not in yaml.safe_load((tmp_path / "model/vlm.yaml").read_text())
