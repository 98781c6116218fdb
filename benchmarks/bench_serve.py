"""Serving under load: `bridgevlm serve` on 127.0.0.1, streaming greedy chat completions, each a
question about a Shapes-world scene sent as a data: URL, over loopback.

Modes, each run for a bounded time (requests still in flight at the end are waited for and counted):
- sequential: one client sends the prompts one after another (each request runs alone);
- concurrent: N clients, each sending prompts in a loop, against a server batching up to N requests
  (the clients draw from the prompts the sequential phase answered, so every reply has a reference);
- one at a time under load: the same N clients against a `--max-batch 1` server.
Figures per mode: completion tokens/s, p50/p95 request latency and time to first token; then the
throughput ratios concurrent / sequential and concurrent / one at a time.

Checks: every request succeeds, and every reply under load equals the sequential reply to its prompt.

    python benchmarks/bench_serve.py [--clients 8 --seconds 40 --max-tokens 64 --threads 2 --model DIR]
"""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from openai import OpenAI
from transformers import AutoTokenizer, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE_SIZE, SHIPPED_TOKENIZER, THREADS, check, machine, reference_config  # noqa: E402

from bridgevlm.data.images import ImageProcessor  # noqa: E402
from bridgevlm.data.shapes.families import HELD_IN  # noqa: E402
from bridgevlm.data.shapes.render import render_scene  # noqa: E402
from bridgevlm.data.shapes.scene import sample_scene  # noqa: E402
from bridgevlm.data.shapes.world import conversation  # noqa: E402

MODEL_NAME = "bench"


def save_reference(directory: Path) -> Path:
    """The reference LLaVA's shape (common.py), saved as a HF Llava directory with the shipped tokenizer.

    Its weights differ from common.py's so that greedy replies are text that depends on the prompt:
    with the default init (std 0.02) every prompt's reply is one word repeated, and most of the 32000
    head rows are ids the 729-token tokenizer decodes to nothing. So the init std is 0.1, head rows
    other than EOS and the tokens that decode to text alone are zero (those ids never win), and the
    head is scaled as in bench_generate, so a greedy choice is not decided by the rounding
    differences between a batch and a lone request. The arithmetic per token is unchanged."""
    torch.manual_seed(0)
    config = reference_config()
    config.initializer_range = config.text_config.initializer_range = 0.1
    model = LlavaForConditionalGeneration(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    text = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    text[:len(tokenizer)] = torch.tensor([i not in tokenizer.all_special_ids and "\ufffd" not in tokenizer.decode([i])
                                          for i in range(len(tokenizer))])
    text[tokenizer.eos_token_id] = True
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[~text] = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ImageProcessor(size=IMAGE_SIZE).save_pretrained(directory)
    return directory


def build_prompts(count: int, seed: int = 11) -> list[list[dict]]:
    """`count` distinct chat requests: a rendered scene (PNG data: URL) and a first question about it."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        scene = sample_scene(rng, f"serve_{i}", "test", 0.35)
        question = conversation(scene, rng, HELD_IN, 1, "")[0]["value"].strip()
        png = io.BytesIO()
        render_scene(scene, IMAGE_SIZE).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": question}]}])
    return out


# --- the server ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return json.loads(response.read())


@contextmanager
def serving(model_dir: Path, max_batch: int, max_queue: int, threads: int, log: Path):
    """A `bridgevlm serve` subprocess on a free loopback port, yielding its base URL; stopped on exit."""
    port = free_port()
    # The server is what is measured: its torch threads are fixed; the client threads only wait on sockets.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "bridgevlm.cli", "serve", str(model_dir), "--port", str(port),
               "--model-name", MODEL_NAME, "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bridgevlm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bridgevlm serve did not come up in 180 s:\n{log.read_text()[-3000:]}")
            try:
                health(url)
                break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        if process.poll() is not None:
            print(f"bridgevlm serve exited with {process.returncode} during the benchmark:\n"
                  f"{log.read_text()[-3000:]}", flush=True)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the clients ---------------------------------------------------------------------------------

@dataclass
class Reply:
    prompt: int
    start: float
    end: float
    first: float | None = None  # when the first non-empty content arrived
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    error: str | None = None


def ask(client: OpenAI, messages: list[dict], prompt: int, max_tokens: int) -> Reply:
    """One streaming greedy request, timed from sending to the last chunk."""
    reply = Reply(prompt, time.perf_counter(), 0.0)
    parts = []
    try:
        stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                reply.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    reply.first = reply.first or time.perf_counter()
                    parts.append(choice.delta.content)
                reply.finish = choice.finish_reason or reply.finish
        if reply.finish is None:
            reply.error = "the stream ended without a finish_reason"
    except Exception as error:  # counted and reported by the check; the load goes on
        reply.error = f"{type(error).__name__}: {error}"
    reply.end = time.perf_counter()
    reply.text = "".join(parts)
    return reply


def load(url: str, prompts: list[list[dict]], orders: list[list[int]], seconds: float,
         max_tokens: int) -> tuple[list[Reply], float]:
    """One client thread per order, each sending its prompts in a loop until `seconds` have passed;
    returns every reply and the seconds from the start to the last reply's end."""
    replies: list[Reply] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client_loop(order: list[int]) -> None:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        for prompt in itertools.cycle(order):
            if time.perf_counter() >= deadline:
                break
            reply = ask(client, prompts[prompt], prompt, max_tokens)
            with lock:
                replies.append(reply)
        client.close()

    threads = [threading.Thread(target=client_loop, args=(order,)) for order in orders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies, max((r.end for r in replies), default=time.perf_counter()) - start


def warm_up(url: str, prompts: list[list[dict]], max_tokens: int) -> None:
    """Two requests, untimed: first-call costs (allocator, lazy imports) stay out of the figures."""
    with OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        for prompt in (0, 1 % len(prompts)):
            reply = ask(client, prompts[prompt], prompt, max_tokens)
            if reply.error is not None:
                raise RuntimeError(f"the warm-up request failed: {reply.error}")


def spread(indices: list[int], clients: int) -> list[list[int]]:
    """Each client's prompt order: the same prompts, client c starting c/N of the way along."""
    return [indices[c * len(indices) // clients:] + indices[:c * len(indices) // clients] for c in range(clients)]


def summarise(name: str, replies: list[Reply], elapsed: float, extra: str = "") -> dict:
    done = [r for r in replies if r.error is None]
    tokens = sum(r.tokens for r in done)
    latency = [r.end - r.start for r in done]
    ttft = [r.first - r.start for r in done if r.first is not None]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    record = {"name": name, "tokens_per_s": tokens / elapsed, "unit": "completion tokens/s", "requests": len(done),
              "errors": len(replies) - len(done), "seconds": elapsed, "completion_tokens": tokens,
              "latency_p50_s": pct(latency, 50), "latency_p95_s": pct(latency, 95),
              "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95)}
    print(f"{name}: {record['tokens_per_s']:.4g} completion tokens/s ({tokens} tokens, {len(done)} requests "
          f"in {elapsed:.1f} s{extra}); latency p50 {record['latency_p50_s']:.3g} s, p95 "
          f"{record['latency_p95_s']:.3g} s; time to first token p50 {record['ttft_p50_s']:.3g} s, p95 "
          f"{record['ttft_p95_s']:.3g} s", flush=True)
    return record


def ratio(name: str, numerator: dict, denominator: dict) -> dict:
    value = numerator["tokens_per_s"] / denominator["tokens_per_s"] if denominator["tokens_per_s"] else float("nan")
    print(f"{name}: {value:.2f}", flush=True)
    return {"name": name, "ratio": value}


def same_as(reference: dict[int, Reply], replies: list[Reply], name: str) -> dict:
    compared = [r for r in replies if r.error is None]
    equal = [r for r in compared if r.text == reference[r.prompt].text and r.tokens == reference[r.prompt].tokens]
    detail = f"{len(equal)}/{len(compared)} replies identical over {len({r.prompt for r in compared})} prompts"
    differing = sorted({r.prompt for r in compared} - {r.prompt for r in equal})
    if differing:
        detail += f"; differing prompts {differing[:10]}"
    return check(name, len(equal) == len(compared) and bool(compared), detail)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, and the server's --max-batch")
    parser.add_argument("--seconds", type=float, default=40.0, help="time each load phase sends requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts (scenes) to draw from")
    parser.add_argument("--threads", type=int, default=THREADS, help="the server's torch/OpenMP threads")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model to serve (default: the reference LLaVA of common.py, saved to a temp dir)")
    parser.add_argument("--one-at-a-time", action=argparse.BooleanOptionalAction, default=True,
                        help="also load a --max-batch 1 server with the N clients")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; server threads {args.threads}, {args.clients} clients, "
          f"{args.max_tokens} max tokens, {args.seconds:g} s a phase", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bridgevlm_bench_serve_"))
    try:
        model_dir = args.model or save_reference(workdir / "llava")
        prompts = build_prompts(args.prompts)
        queue = max(64, args.clients)
        records = []
        with serving(model_dir, args.clients, queue, args.threads, workdir / "batching.log") as url:
            warm_up(url, prompts, args.max_tokens)
            sequential, seconds = load(url, prompts, [list(range(len(prompts)))], args.seconds, args.max_tokens)
            records.append(summarise("sequential: 1 client, one request after another", sequential, seconds))
            reference = {}
            for reply in sequential:
                if reply.error is None:
                    reference.setdefault(reply.prompt, reply)
            orders = spread(sorted(reference), args.clients)
            concurrent, seconds = load(url, prompts, orders, args.seconds, args.max_tokens)
            peak = health(url)["peak_batch"]
            records.append(summarise(f"concurrent: {args.clients} clients, continuous batching (--max-batch "
                                     f"{args.clients})", concurrent, seconds, f", peak batch {peak}"))
            records[-1]["peak_batch"] = peak
        records.append(ratio("throughput ratio concurrent / sequential", records[1], records[0]))
        loaded = [("concurrent", concurrent)]
        if args.one_at_a_time:
            with serving(model_dir, 1, queue, args.threads, workdir / "one_at_a_time.log") as url:
                warm_up(url, prompts, args.max_tokens)
                one, seconds = load(url, prompts, orders, args.seconds, args.max_tokens)
            records.append(summarise(f"one at a time: {args.clients} clients, --max-batch 1", one, seconds))
            records.append(ratio("throughput ratio concurrent / one at a time", records[1], records[-1]))
            loaded.append(("one at a time", one))
        everything = sequential + [r for _, replies in loaded for r in replies]
        errors = [r.error for r in everything if r.error is not None]
        records.append(check("every request succeeded", not errors,
                             f"{len(everything) - len(errors)}/{len(everything)}"
                             + (f"; first error: {errors[0][:300]}" if errors else "")))
        for name, replies in loaded:
            records.append(same_as(reference, replies, f"{name} replies equal the sequential replies (greedy)"))
        return records
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
