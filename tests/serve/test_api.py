"""The OpenAI-compatible API, through the official `openai` client against a real `bridgevlm serve`
process: replies equal `answer()`, streaming, concurrency, and every kind of bad request."""
from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import openai
import pytest
import uvicorn
from PIL import Image

import bridgevlm
from bridgevlm.infer.generate import GenerationConfig
from bridgevlm.infer.pipeline import answer
from bridgevlm.serve.app import create_app
from bridgevlm.serve.config import ServeConfig
from bridgevlm.serve.engine import GenerationEngine

from conftest import MODEL_NAME, data_url, free_port


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loaded(shapes_vlm):
    return bridgevlm.load(shapes_vlm[0])


def _user(text, image=None):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": parts}


def _expected(loaded, path, question, max_tokens, **generation):
    """What bridgevlm answers in-process to one question about the image at `path`."""
    return answer(loaded, [[{"from": "human", "value": f"<image>\n{question}"}]],
                  [[Image.open(path).convert("RGB")]], GenerationConfig(max_new_tokens=max_tokens, **generation))[0]


def _post(server, body: bytes, content_type="application/json"):
    request = urllib.request.Request(f"{server.api}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _still_serving(client, server):
    reply = client.chat.completions.create(model=server.model, messages=[_user("Say something.")], max_tokens=3,
                                           temperature=0)
    assert reply.choices[0].message.content


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    with urllib.request.urlopen(f"{server.url}/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and health["max_batch"] == 4


def test_a_reply_with_an_image_equals_answer_in_process(client, server, loaded):
    red = server.images[0]
    question = "Where is the object?"
    reply = client.chat.completions.create(model=server.model, messages=[_user(question, data_url(red))],
                                           max_tokens=9, temperature=0)
    expected = _expected(loaded, red, question, 9)
    assert reply.choices[0].message.content.strip() == expected and expected
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.model == MODEL_NAME
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage.completion_tokens <= 9 and reply.usage.prompt_tokens > 9  # 9 visual tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    blue = client.chat.completions.create(model=server.model, max_tokens=9, temperature=0,
                                          messages=[_user(question, data_url(server.images[1]))])
    assert blue.choices[0].message.content != reply.choices[0].message.content  # the image matters


def test_streaming_adds_up_to_the_plain_reply(client, server):
    messages = [_user("What colour is it?", data_url(server.images[2]))]
    plain = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_multi_turn_system_stop_and_seeded_choices(client, server, loaded):
    history = [{"role": "system", "content": "You answer briefly."}, _user("What colour?", data_url(server.images[0])),
               {"role": "assistant", "content": "red"}, {"role": "user", "content": "Sure?"}]
    reply = client.chat.completions.create(model=server.model, messages=history, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert text
    stopped = client.chat.completions.create(model=server.model, messages=history, max_tokens=12, temperature=0,
                                             stop=[text[2:4]])
    assert stopped.choices[0].message.content == text[:text.index(text[2:4])]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = partial(client.chat.completions.create, model=server.model, messages=history, max_tokens=8,
                      temperature=1.5, n=3, seed=11)
    first, again = sampled(), sampled()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # each choice draws from its own seed


def test_concurrent_requests_get_their_sequential_replies(client, server):
    questions = [(server.images[i % 3], q, 4 + 3 * i) for i, q in enumerate(
        ["What colour?", "What shape?", "How many?", "Where is it?", "Is there a square?", "Describe it."])]

    def ask(case):
        path, question, budget = case
        reply = client.chat.completions.create(model=server.model, messages=[_user(question, data_url(path))],
                                               max_tokens=budget, temperature=0)
        return reply.choices[0].message.content

    sequential = [ask(case) for case in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        concurrent = list(pool.map(ask, questions * 2))
    assert concurrent == sequential * 2
    with urllib.request.urlopen(f"{server.url}/health") as response:
        assert json.loads(response.read())["peak_batch"] > 1  # they were decoded together


def test_file_paths_only_under_the_image_root(client, server, tmp_path):
    red = server.images[0]
    by_data = client.chat.completions.create(model=server.model, messages=[_user("Colour?", data_url(red))],
                                             max_tokens=6, temperature=0)
    for url in (red.name, str(red), f"file://{red}"):
        by_path = client.chat.completions.create(model=server.model, messages=[_user("Colour?", url)], max_tokens=6,
                                                 temperature=0)
        assert by_path.choices[0].message.content == by_data.choices[0].message.content
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), "red").save(outside)
    for url in (str(outside), f"../{red.parent.name}/../{outside.name}", "/etc/passwd"):
        with pytest.raises(openai.PermissionDeniedError, match="outside the allowed image directory"):
            client.chat.completions.create(model=server.model, messages=[_user("Colour?", url)], max_tokens=4)
    _still_serving(client, server)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    status, body = _post(server, b'{"model": "tiny-vlm", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, body = _post(server, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 400 and body["error"]["param"] == "model" and "Field required" in body["error"]["message"]
    status, body = _post(server, json.dumps({"model": MODEL_NAME, "messages": [{"role": "user"}],
                                             "temperature": 7}).encode())
    assert status == 400 and body["error"]["param"] == "temperature"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[_user("hi")])
    not_an_image = "data:image/png;base64," + base64.b64encode(b"this is plain text, not a PNG").decode()
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\]: the data is not an image"):
        client.chat.completions.create(model=server.model, messages=[_user("Colour?", not_an_image)])
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(model=server.model, messages=[_user("Colour?", "data:image/png;base64,@@@")])
    with pytest.raises(openai.BadRequestError, match="does not fetch remote image URLs"):
        client.chat.completions.create(model=server.model, messages=[_user("Colour?", "http://example.com/a.png")])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.chat.completions.create(model=server.model, messages=[_user("hi")], max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="end with a user message"):
        client.chat.completions.create(model=server.model, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only user messages may hold images"):
        client.chat.completions.create(model=server.model, messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(server.images[0])}}]},
            {"role": "user", "content": "and?"}])
    with pytest.raises(openai.BadRequestError, match="n must be at most 8"):
        client.chat.completions.create(model=server.model, messages=[_user("hi")], n=9)
    huge = json.dumps({"model": MODEL_NAME, "messages": [_user("hi", "data:image/png;base64," + "A" * (2 * 2 ** 20))]})
    status, body = _post(server, huge.encode())  # the server runs with --max-body-mb 1
    assert status == 413 and "larger than" in body["error"]["message"]
    status, body = _post(server, b"{}", content_type="text/plain")
    assert status == 400
    with urllib.request.urlopen(f"{server.url}/health") as response:
        assert response.status == 200
    _still_serving(client, server)
    assert server.alive()


def test_no_image_data_in_the_log(client, server):
    url = data_url(server.images[1])
    client.chat.completions.create(model=server.model, messages=[_user("Colour?", url)], max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[_user("Colour?", url[:-8] + "@@@@@@@@")])
    log = server.log.read_text()
    payload = url.split(",", 1)[1]
    assert "1 image(s)" in log  # requests are logged, by their shape
    assert payload[:24] not in log and payload[-24:-8] not in log


# ------------------------------------------------------------------ servers with other settings, in-process


class _InThread:
    """The app under uvicorn in a thread of this process: for settings the shared server does not have."""

    def __init__(self, loaded, **settings):
        cfg = ServeConfig(port=free_port(), **settings)
        app = create_app(GenerationEngine(loaded, max_batch=cfg.max_batch, max_queue=cfg.max_queue), cfg, MODEL_NAME)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="none", max_retries=0,
                                    timeout=60)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.05)
        return self.client

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_a_full_queue_gets_503_and_a_late_request_504(loaded):
    with _InThread(loaded, max_queue=0) as client:
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model=MODEL_NAME, messages=[_user("hi")], max_tokens=3)
        assert error.value.status_code == 503 and "busy" in str(error.value)
    with _InThread(loaded, request_timeout_s=1e-6) as client:
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model=MODEL_NAME, messages=[_user("hi")], max_tokens=3)
        assert error.value.status_code == 504 and "limit" in str(error.value)
        stream = client.chat.completions.create(model=MODEL_NAME, messages=[_user("hi")], max_tokens=3, stream=True)
        with pytest.raises(openai.APIError, match="limit"):  # the status line went out before the deadline passed
            list(stream)


def test_remote_images_only_when_enabled(loaded, shapes_vlm):
    _, images = shapes_vlm
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(images[0].parent))
    handler.log_message = lambda *args: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/{images[0].name}"
    try:
        with _InThread(loaded) as client:
            with pytest.raises(openai.BadRequestError, match="does not fetch remote"):
                client.chat.completions.create(model=MODEL_NAME, messages=[_user("Colour?", url)], max_tokens=3)
        with _InThread(loaded, allow_remote_images=True) as client:
            remote = client.chat.completions.create(model=MODEL_NAME, messages=[_user("Colour?", url)], max_tokens=5,
                                                    temperature=0)
            local = client.chat.completions.create(model=MODEL_NAME, max_tokens=5, temperature=0,
                                                   messages=[_user("Colour?", data_url(images[0]))])
            assert remote.choices[0].message.content == local.choices[0].message.content
            with pytest.raises(openai.BadRequestError, match="could not fetch"):
                client.chat.completions.create(model=MODEL_NAME, messages=[_user("Colour?", url + ".missing")])
    finally:
        files.shutdown()
