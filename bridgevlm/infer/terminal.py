"""`bridgevlm chat`: a multi-turn conversation in the terminal, streaming the reply as it is generated."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from ..data.images import ImageLoadError, load_image
from ..models.assemble import LoadedVlm
from .generate import GenerationConfig
from .pipeline import Chat

HELP = "commands: /image PATH (switch image, new conversation), /reset (new conversation), /quit"


def run_terminal_chat(loaded: LoadedVlm, image: Path | None, cfg: GenerationConfig,
                      stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    chat = Chat(loaded, load_image(image) if image else None, cfg)
    print(f"image: {image or 'none'}. {HELP}", file=stdout)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=stdout)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            chat.reset()
            print("(new conversation)", file=stdout)
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                chat.reset(load_image(path))
                print(f"(image {path}; new conversation)", file=stdout)
            except ImageLoadError as error:
                print(f"error: {error}", file=stdout)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {HELP}", file=stdout)
            continue
        print("model> ", end="", file=stdout, flush=True)
        for piece in chat.stream(text):
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout)
