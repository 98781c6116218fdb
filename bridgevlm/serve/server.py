"""`bridgevlm serve`: load a model, start the engine and run the app under uvicorn."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import ServeConfig


def build_app(model: str | Path, cfg: ServeConfig):
    """The app serving the model at `model` (a run, a bridgevlm model or a HF Llava/BLIP-2 directory)."""
    from ..loading import find_model_dir, load
    from .app import create_app
    from .engine import GenerationEngine

    loaded = load(model)
    name = cfg.model_name or find_model_dir(model).resolve().name
    return create_app(GenerationEngine(loaded, max_batch=cfg.max_batch, max_queue=cfg.max_queue), cfg, name), name


def run_server(model: str | Path, cfg: ServeConfig) -> None:
    import uvicorn

    cfg.check()
    app, name = build_app(model, cfg)
    logging.getLogger("bridgevlm.serve").info("serving %s at http://%s:%d (chat page at /, API at /v1)", name,
                                              cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
