"""A real `bridgevlm serve` process on 127.0.0.1, serving a VLM of the shipped backbones, for the API and
page tests."""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_NAME = "tiny-vlm"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model: str
    model_dir: Path
    images: list[Path]  # red, blue, green PNGs, under the server's --image-root
    process: subprocess.Popen
    log: Path

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def start_server(model_dir: Path, image_root: Path, log: Path, *options: str) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bridgevlm.cli", "serve", str(model_dir), "--port", str(port),
               "--model-name", MODEL_NAME, "--image-root", str(image_root), *options]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bridgevlm serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError(f"bridgevlm serve did not come up in 120 s:\n{log.read_text()}")
    images = sorted(image_root.glob("*.png"))
    return Server(url, MODEL_NAME, model_dir, images, process, log)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


ASSETS = Path(__file__).resolve().parents[2] / "bridgevlm" / "assets" / "backbones"


@pytest.fixture(scope="session")
def shapes_vlm(tmp_path_factory):
    """The shipped tiny CLIP and LM joined by an untrained, seeded projector: it answers in words, and its
    answers depend on the image. (model directory, [red.png, blue.png, green.png])."""
    import torch
    from PIL import Image

    from bridgevlm.config import from_dict
    from bridgevlm.models.assemble import VlmConfig, build_vlm, save_vlm

    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, {
        "vision": {"path": str(ASSETS / "clip"), "feature_layer": -2, "select": "patch"},
        "connector": {"kind": "mlp2x_gelu", "pool": 3}, "llm": str(ASSETS / "lm"), "image_aspect": "pad",
        "template": "vicuna_v1_nosys"}))
    root = tmp_path_factory.mktemp("shapes_vlm")
    save_vlm(loaded, root / "model")
    (root / "images").mkdir()
    images = []
    for colour in ("red", "blue", "green"):
        images.append(root / "images" / f"{colour}.png")
        Image.new("RGB", (96, 96), colour).save(images[-1])
    return root / "model", images


@pytest.fixture(scope="session")
def server(shapes_vlm, tmp_path_factory):
    model_dir, images = shapes_vlm
    log = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server(model_dir, images[0].parent, log, "--max-batch", "4", "--max-body-mb", "1")
    running.images = images
    yield running
    stop_server(running)
