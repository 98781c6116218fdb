"""The `bridgevlm` command."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__

# The recipe tasks `train` accepts (bridgevlm.recipes.registry.RECIPES; spelled out so --help stays fast).
RECIPE_TASKS = ("clip", "lm", "backbones", "vlm", "blip2_stage1")
# What `quickstart --bridge` trains (bridgevlm.quickstart.BRIDGES) and the recipe names --bridge-recipe takes
# (bridgevlm.quickstart.RECIPES), spelled out for the same reason.
QUICKSTART_BRIDGES = ("llava", "qformer", "crome", "partial_lora", "flamingo")
QUICKSTART_RECIPES = ("llava", "blip2_stage1", "instructblip", "multitask_plain", "multitask_prefix", "crome",
                      "crome_bridge_finetune", "partial_lora", "flamingo")

EXAMPLES = """examples:
  bridgevlm quickstart --out runs/quickstart          world, shipped backbones, evaluation, report
  bridgevlm quickstart --out runs/qs --from-scratch   also pretrain the tiny backbones (tens of CPU-minutes)
  bridgevlm world --out runs/world --seed 0 --scenes 2000
  bridgevlm train configs/shapes/clip.yaml --out runs/clip world=runs/world train.max_steps=500
  bridgevlm eval lm bridgevlm/assets/backbones/lm --world runs/quickstart/world
  bridgevlm train configs/shapes/llava.yaml --out runs/llava world=runs/quickstart/world
  bridgevlm eval vlm runs/llava --world runs/quickstart/world
  bridgevlm train configs/shapes/blip2_stage1.yaml --out runs/blip2_stage1 world=runs/quickstart/world
  bridgevlm train configs/shapes/blip2.yaml --out runs/blip2 world=runs/quickstart/world model.connector.init=runs/blip2_stage1
  bridgevlm train configs/shapes/instructblip.yaml --out runs/instructblip world=runs/quickstart/world model.connector.init=runs/blip2_stage1
  bridgevlm eval vlm runs/instructblip --world runs/quickstart/world --rank-candidates --blind
  bridgevlm train configs/shapes/crome.yaml --out runs/crome world=runs/quickstart/world model.connector.init=runs/blip2_stage1
  bridgevlm train configs/shapes/partial_lora.yaml --out runs/plora world=runs/quickstart/world
  bridgevlm train configs/shapes/flamingo.yaml --out runs/flamingo world=runs/quickstart/world
  bridgevlm quickstart --out runs/qs-qformer --bridge qformer --studies   BLIP-2 + InstructBLIP, ablation
  bridgevlm quickstart --out runs/qs-all --bridge all --studies   every bridge, the papers' controls, a comparison
  bridgevlm chat runs/llava --image runs/quickstart/world/images/test/test_000000.png
  bridgevlm serve runs/llava --port 8000        OpenAI-compatible API at /v1, chat page at /
  bridgevlm export runs/llava --out exported/llava-shapes            (LoRA merged, standalone)
  bridgevlm export runs/llava --out exported/llava-hf --format llava (a transformers Llava directory)
  bridgevlm convert path/to/llava-1.5-7b-hf --out models/llava15     (a transformers Llava, BLIP-2 or InstructBLIP)
  bridgevlm params configs/llava15/stage2_lora.yaml configs/crome/vicuna7b.yaml   trainable vs total, per stage
"""

PARAMS_EXAMPLES = """examples:
  bridgevlm params configs/shapes/llava.yaml configs/shapes/flamingo.yaml
  bridgevlm params configs/shapes/crome.yaml --stage1 configs/shapes/blip2_stage1.yaml
  bridgevlm params configs/llava15/stage2_lora.yaml configs/crome/vicuna7b.yaml --json
  # a Shapes recipe at 7B scale, through overrides:
  bridgevlm params configs/shapes/partial_lora.yaml model.llm=lmsys/vicuna-7b-v1.5 \\
      model.vision.path=openai/clip-vit-large-patch14-336 model.connector.partial_lora.rank=256
"""


def _add_world(sub) -> None:
    p = sub.add_parser("world", help="generate the synthetic Shapes world (images, captions, instructions, eval files)",
                       description="Generate the Shapes world. Same seed and options, same bytes.")
    p.add_argument("--out", required=True, type=Path, help="directory to write (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=2000, help="number of scenes over train/val/test (default 2000)")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--text-probability", type=float, default=0.35, help="share of scenes with a rendered word or digit")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="run a recipe (YAML) with dotted overrides",
                       description="Run a training recipe. The YAML's `task` picks the recipe "
                                   f"({', '.join(RECIPE_TASKS)}); any field can be overridden as key.sub=value.")
    p.add_argument("recipe", type=Path, help="recipe YAML, e.g. configs/shapes/clip.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.lr=1e-4 train.max_steps=100")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumes if it holds checkpoints)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a CLIP, LM or vision-language model on a world's test scenes",
                       description="Evaluate a model on a Shapes world and print metrics as JSON.")
    p.add_argument("kind", choices=["clip", "lm", "vlm"],
                   help="clip: zero-shot + retrieval; lm: text QA + perplexity; vlm: VQA per family, held-in/out")
    p.add_argument("model", type=Path, help="model directory (or, for vlm, a run directory)")
    p.add_argument("--limit", type=int, default=None, help="vlm: at most this many questions per family")
    p.add_argument("--blind", action="store_true", help="vlm: also ask without the image (blind baseline)")
    p.add_argument("--rank-candidates", action="store_true",
                   help="vlm: answer yes/no, multiple-choice and classification questions by the likeliest "
                        "candidate instead of generating (InstructBLIP's protocol)")
    p.add_argument("--num-beams", type=int, default=1, help="vlm: beam search width (BLIP-2's zero-shot VQA: 5)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="vlm: beam score = log-likelihood / length**penalty; below 0 favours short answers")
    p.add_argument("--max-new-tokens", type=int, default=12, help="vlm: longest answer generated")
    p.add_argument("--world", required=True, type=Path)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--template", default=None,
                   help="prompt format. lm: default vicuna_v1_nosys; vlm: default the model's, e.g. blip2_vqa for "
                        "BLIP-2's zero-shot 'Question: {} Answer:' or blip2_vqa_short for '... Short answer:'")


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the embedded default, with a report",
                       description="Generate the world, load the shipped tiny backbones (or make them with "
                                   "--from-scratch), evaluate them, train and evaluate bridges on them (LLaVA by "
                                   "default; --bridge picks others, each through its configs/shapes recipe), and "
                                   "write DIR/report.json and DIR/report.md.")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output directory (default runs/quickstart)")
    p.add_argument("--from-scratch", action="store_true", help="pretrain the tiny CLIP and LM instead of loading them")
    p.add_argument("--budget", type=float, default=1.0, help="multiplier on every training stage's steps (default 1)")
    p.add_argument("--backbones", type=Path, default=None, help="backbones directory to load (default: the shipped ones)")
    p.add_argument("--recipe", type=Path, default=None, help="backbone recipe for --from-scratch")
    p.add_argument("--bridge", type=_bridge_list, default=("llava",), metavar="BRIDGES",
                   help="what to train after the backbones, comma-separated: llava (LLaVA-1.5, the default, about 5 "
                        "minutes), qformer (BLIP-2 stage 1, then InstructBLIP; about 40 minutes, most of it stage 1), "
                        "crome (BLIP-2 stage 1, then CROME's stages), partial_lora, flamingo (about 10 minutes each); "
                        "all, or none (stop after the backbones). With two or more, the report compares them.")
    p.add_argument("--bridge-recipe", action="append", default=[], metavar="NAME=PATH",
                   type=_recipe_choice,
                   help="run another recipe for one of the quickstart's steps (repeatable). NAME: "
                        f"{', '.join(QUICKSTART_RECIPES)} (default: configs/shapes/NAME.yaml; the ablation's "
                        "under configs/shapes/instructblip_ablation/)")
    p.add_argument("--studies", action="store_true",
                   help="also run the papers' controls for the bridges chosen: for qformer, InstructBLIP's ablation "
                        "(multitask training on plain and on [Task:Dataset]-tagged inputs) and InstructBLIP with "
                        "BLIP-2 stage 1 skipped (3 more instruction tunings); for crome, its task fine-tuning of the "
                        "whole bridge against the adapter alone (one more stage)")
    p.add_argument("--no-progress", action="store_true")


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk with a vision-language model about an image, in the terminal",
                       description="Multi-turn chat; the reply streams as it is generated. In the chat: "
                                   "/image PATH switches the image, /reset starts over, /quit leaves.")
    p.add_argument("model", type=Path, help="a run directory, a bridgevlm model directory or a HF Llava directory")
    p.add_argument("--image", type=Path, default=None, help="image to talk about")
    _add_generation_options(p)


SERVE_EXAMPLES = """examples:
  bridgevlm serve runs/quickstart/llava
  bridgevlm serve runs/llava --port 8080 --image-root runs/quickstart/world/images --max-batch 16
then, from Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  client.chat.completions.create(model="llava", messages=[{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
      {"type": "text", "text": "What colour is the circle?"}]}], temperature=0)
"""


def _add_serve(sub) -> None:
    from .serve.config import MIB, ServeConfig

    d = ServeConfig()
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EXAMPLES,
                       description="POST /v1/chat/completions (OpenAI's request and response shapes, streaming as "
                                   "server-sent events, images as data: URLs), GET /v1/models, GET /health, and a "
                                   "chat page at /. Concurrent requests are decoded together (continuous batching); "
                                   "a greedy reply equals the reply the request gets alone. Needs the serve extra: "
                                   "pip install 'bridgevlm[serve]'. The API has no authentication: keep it on "
                                   "loopback or behind a proxy that adds it.")
    p.add_argument("model", type=Path, help="a run directory, a bridgevlm model directory or a HF Llava / BLIP-2 / "
                                            "InstructBLIP directory")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"(default {d.port})")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: the model "
                                                      "directory's name)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"requests decoded together (default {d.max_batch})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests that may wait for a slot; beyond that, 503 (default {d.max_queue})")
    p.add_argument("--timeout", type=float, default=d.request_timeout_s,
                   help=f"seconds a request may take, queueing included; then 504 (default {d.request_timeout_s:g})")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MIB,
                   help=f"largest request body in MiB; larger gets 413 (default {d.max_body_bytes / MIB:g})")
    p.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / MIB,
                   help=f"largest encoded image in MiB (default {d.max_image_bytes / MIB:g})")
    p.add_argument("--max-tokens", type=int, default=d.default_max_tokens,
                   help=f"max_tokens when a request gives none (default {d.default_max_tokens})")
    p.add_argument("--image-root", type=Path, default=None,
                   help="allow image URLs that are file paths, only under this directory (default: none allowed)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (default: refused; clients send data: URLs)")


def _add_generation_options(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a standalone model directory (LoRA merged)",
                       description="Merge LoRA adapters and write a model that no longer depends on the "
                                   "pretrained parts' paths: a bridgevlm directory, or a transformers Llava one.")
    p.add_argument("model", type=Path, help="a run directory or a bridgevlm model directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--format", choices=["bridgevlm", "llava"], default="bridgevlm",
                   help="llava: LlavaForConditionalGeneration (needs a CLIP tower and an mlp2x_gelu connector)")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a transformers Llava / BLIP-2 / InstructBLIP directory into a bridgevlm model",
                       description="Import a LlavaForConditionalGeneration, Blip2ForConditionalGeneration or "
                                   "InstructBlipForConditionalGeneration directory (or hub id) with identical outputs.")
    p.add_argument("source", help="HF Llava / BLIP-2 / InstructBLIP directory or hub id")
    p.add_argument("--out", required=True, type=Path)


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="trainable vs total parameters of each stage of recipes, without weights",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PARAMS_EXAMPLES,
                       description="Count what each stage of a vlm (or blip2_stage1) recipe trains against all "
                                   "the model holds, by part (vision, the connector's parts, llm, LoRA). The model "
                                   "is built from configs on the meta device, so nothing is downloaded or "
                                   "allocated and 7B recipes take a second; each stage's `trainable` is applied "
                                   "as training applies it. Architectures come from local directories, else the "
                                   "Hugging Face cache, else bridgevlm's table of the public configs the paper "
                                   "recipes name (the notes say when). Dotted overrides apply to every recipe.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE|KEY=VALUE",
                   help="recipe YAML files, then dotted overrides such as model.llm=lmsys/vicuna-7b-v1.5")
    p.add_argument("--stage1", type=Path, default=None, metavar="RECIPE",
                   help="a blip2_stage1 recipe whose Q-Former stands in for a model.connector.init run that is not "
                        "here (default: the recipe's own connector.qformer sizes, BERT-base unless set)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one report per recipe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridgevlm", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Build vision-language models: a frozen vision encoder and a frozen LLM joined by a small trained bridge.")
    parser.add_argument("--version", action="version", version=f"bridgevlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_quickstart, _add_world, _add_train, _add_eval, _add_chat, _add_serve, _add_export, _add_convert,
                _add_params):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train R.yaml --out D a.b=1`), which argparse leaves unparsed.
    if args.command in ("train", "params") and all("=" in item and not item.startswith("-") for item in extra):
        getattr(args, "overrides" if args.command == "train" else "recipes").extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .config import ConfigError
    from .data.formats import DataFormatError
    from .data.images import ImageLoadError
    from .data.templates import ConversationError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataFormatError, ImageLoadError, ConversationError, FileNotFoundError, ValueError) as error:
        print(f"bridgevlm {args.command}: error: {error}", file=sys.stderr)
        return 2


def _world(args) -> int:
    from .data.shapes.world import WorldConfig, build_world

    cfg = WorldConfig(seed=args.seed, scenes=args.scenes, image_size=args.image_size, text_probability=args.text_probability)
    out = build_world(args.out, cfg)
    print(f"wrote the Shapes world to {out} ({json.loads((out / 'world.json').read_text())['splits']})")
    return 0


def _train(args) -> int:
    from .recipes.registry import run_recipe_file

    result = run_recipe_file(args.recipe, args.overrides, args.out, progress=not args.no_progress)
    if result.get("metrics"):  # under torchrun only rank 0 evaluates
        print(json.dumps(result["metrics"], indent=1))
    return 0


def _eval(args) -> int:
    from transformers import AutoTokenizer

    if args.kind == "vlm":
        from .eval.vqa import evaluate_vqa_on_world
        from .loading import load

        loaded = load(args.model)
        from .infer.generate import GenerationConfig

        generation = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                      length_penalty=args.length_penalty)
        ask = dict(split=args.split, limit_per_family=args.limit, rank_candidates=args.rank_candidates,
                   template=args.template, generation=generation)
        metrics = {"vqa": evaluate_vqa_on_world(loaded, args.world, **ask)}
        if args.blind:
            metrics["blind"] = evaluate_vqa_on_world(loaded, args.world, blind=True, **ask)
        print(json.dumps(metrics, indent=1))
        return 0
    if not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"model directory not found (no config.json): {args.model}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.kind == "clip":
        from .data.images import ImageProcessor
        from .eval.clip_eval import evaluate_clip_on_world
        from .models.contrastive import ContrastiveModel

        model = ContrastiveModel.from_pretrained(args.model)
        processor = ImageProcessor(size=model.clip.config.vision_config.image_size)
        metrics = evaluate_clip_on_world(model, tokenizer, processor, args.world, args.split)
    else:
        from .data.templates import get_template
        from .models.llm import LanguageModel
        from .recipes.lm import evaluate_lm

        metrics = evaluate_lm(LanguageModel.from_pretrained(args.model), tokenizer, get_template(args.template or "vicuna_v1_nosys", tokenizer),
                              args.world, args.split)
    print(json.dumps(metrics, indent=1))
    return 0


def _quickstart(args) -> int:
    from .quickstart import QuickstartOptions, run_quickstart

    options = QuickstartOptions(out=args.out, from_scratch=args.from_scratch, budget=args.budget,
                                bridges=args.bridge, studies=args.studies, recipes=dict(args.bridge_recipe),
                                progress=not args.no_progress)
    if args.backbones:
        options.backbones = args.backbones
    if args.recipe:
        options.recipe = args.recipe
    run_quickstart(options)
    return 0


def _bridge_list(text: str) -> tuple[str, ...]:
    """--bridge: comma-separated bridge names, or all, or none."""
    if text == "all":
        return QUICKSTART_BRIDGES
    if text == "none":
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in QUICKSTART_BRIDGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown bridge {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(QUICKSTART_BRIDGES)}, all or none (comma-separated)")
    return names


def _recipe_choice(text: str) -> tuple[str, Path]:
    """--bridge-recipe NAME=PATH."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if name not in QUICKSTART_RECIPES:
        raise argparse.ArgumentTypeError(f"unknown recipe name {name!r}; choose from {', '.join(QUICKSTART_RECIPES)}")
    return name, Path(path)


def _generation(args):
    from .infer.generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                           top_k=args.top_k, num_beams=args.num_beams, seed=args.seed)
    cfg.check()
    return cfg


def _chat(args) -> int:
    from .infer.terminal import run_terminal_chat
    from .loading import load

    cfg = _generation(args)
    run_terminal_chat(load(args.model), args.image, cfg)
    return 0


def _serve(args) -> int:
    from .serve.config import MIB, ServeConfig

    try:
        from .serve.server import run_server
        import fastapi, uvicorn  # noqa: F401  (checked here for a clear message)
    except ImportError:
        print("bridgevlm serve: error: serving needs FastAPI and uvicorn: pip install 'bridgevlm[serve]'",
              file=sys.stderr)
        return 2
    cfg = ServeConfig(host=args.host, port=args.port, model_name=args.model_name, max_batch=args.max_batch,
                      max_queue=args.max_queue, request_timeout_s=args.timeout,
                      max_body_bytes=int(args.max_body_mb * MIB), max_image_bytes=int(args.max_image_mb * MIB),
                      default_max_tokens=args.max_tokens,
                      local_image_root=str(args.image_root) if args.image_root else None,
                      allow_remote_images=args.allow_remote_images)
    cfg.check()
    run_server(args.model, cfg)
    return 0


def _export(args) -> int:
    from .loading import find_model_dir
    from .models.assemble import export_vlm, load_vlm

    loaded = load_vlm(find_model_dir(args.model))
    if args.format == "llava":
        from .convert.llava import export_llava

        export_llava(loaded, args.out)
    else:
        export_vlm(loaded, args.out)
    print(f"wrote {args.format} model to {args.out}")
    return 0


def _convert(args) -> int:
    from .loading import import_hf
    from .models.assemble import export_vlm

    export_vlm(import_hf(args.source), args.out)
    print(f"wrote bridgevlm model to {args.out} (try: bridgevlm chat {args.out} --image PATH)")
    return 0


def _params(args) -> int:
    from .eval.param_report import format_report, report_recipe, stage1_source

    recipes = [item for item in args.recipes if "=" not in item]
    overrides = [item for item in args.recipes if "=" in item]
    if not recipes:
        raise ValueError("no recipe given; e.g. bridgevlm params configs/shapes/llava.yaml")
    stage1 = stage1_source(args.stage1) if args.stage1 else None
    reports = [report_recipe(path, overrides, stage1) for path in recipes]
    if args.json:
        print(json.dumps([report.to_dict() for report in reports], indent=1))
    else:
        print("\n\n".join(format_report(report) for report in reports))
    return 0


COMMANDS = {"world": _world, "train": _train, "eval": _eval, "quickstart": _quickstart, "chat": _chat, "serve": _serve,
            "export": _export, "convert": _convert, "params": _params}

if __name__ == "__main__":
    sys.exit(main())
