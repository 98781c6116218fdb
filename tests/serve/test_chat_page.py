"""The chat page in headless Chromium against a real server: what it streams equals what the API answers
for the same conversation, turn after turn, and errors show without breaking the page."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import data_url

MAX_TOKENS = 24  # short replies: two turns stay inside the tiny model's 512-token context
INSTALL = ("install the Debian packages chromium and chromium-driver (`make test` installs them: "
           "sudo apt-get install chromium chromium-driver)")


def _program(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        pytest.fail(f"the chat page test needs {name}, which is not installed: {INSTALL}")
    return found


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = _program("chromium")
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--window-size=1000,800"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(_program("chromedriver")))
    except WebDriverException as error:
        pytest.fail(f"could not start headless Chromium ({error.msg}); {INSTALL}")
    yield driver
    driver.quit()


def api_reply(server, messages: list[dict], max_tokens: int = MAX_TOKENS) -> str:
    """The server's non-streamed reply to `messages` with the page's default settings."""
    body = {"model": server.model, "messages": messages, "temperature": 0, "top_p": 1, "max_tokens": max_tokens}
    request = urllib.request.Request(f"{server.api}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def open_page(browser, server):
    browser.get(server.url)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model-name").text == server.model)
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"
    assert browser.find_element(By.ID, "top-p").get_attribute("value") == "1"
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "256"


def set_max_tokens(browser, value: int) -> None:
    field = browser.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(value))


def finished_reply(browser, index: int):
    """The assistant bubble `index` (0-based) once its reply finished or failed."""
    def finished(driver):
        bubbles = driver.find_elements(By.CSS_SELECTOR, "#transcript .assistant")
        if len(bubbles) <= index:
            return False
        bubble = bubbles[index]
        return bubble if bubble.get_attribute("data-done") or bubble.get_attribute("data-error") else False
    return WebDriverWait(browser, 20).until(finished)


def shown_text(bubble) -> str:
    return bubble.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")


def test_streamed_turns_equal_the_api_replies(browser, server):
    open_page(browser, server)
    set_max_tokens(browser, MAX_TOKENS)
    image = server.images[0]
    browser.find_element(By.ID, "image-input").send_keys(str(image))
    preview = browser.find_element(By.ID, "attachment-preview")
    WebDriverWait(browser, 5).until(lambda d: (preview.get_attribute("src") or "").startswith("data:image/png"))

    question = "What colour is this?"
    browser.find_element(By.ID, "message").send_keys(question)
    browser.find_element(By.ID, "send").click()
    first = finished_reply(browser, 0)
    assert first.get_attribute("data-error") is None, first.text
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                            {"type": "text", "text": question}]}]
    reply = api_reply(server, history)
    assert reply and shown_text(first) == reply
    user = browser.find_element(By.CSS_SELECTOR, "#transcript .user")
    assert user.find_element(By.CSS_SELECTOR, "img").get_attribute("src") == data_url(image)
    assert not browser.find_element(By.ID, "attachment").is_displayed()  # the image went with its message

    follow_up = ["And its shape?", "Answer briefly."]  # Shift+Enter makes a new line, Enter sends
    message = browser.find_element(By.ID, "message")
    message.send_keys(follow_up[0], Keys.SHIFT, Keys.ENTER, Keys.SHIFT, follow_up[1], Keys.ENTER)
    second = finished_reply(browser, 1)
    assert second.get_attribute("data-error") is None, second.text
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "\n".join(follow_up)}]
    assert shown_text(second) == api_reply(server, history)
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#transcript .bubble") == []


def test_a_refused_request_shows_its_error_and_the_chat_goes_on(browser, server):
    open_page(browser, server)
    set_max_tokens(browser, 100000)
    question = "Hello?"
    browser.find_element(By.ID, "message").send_keys(question, Keys.ENTER)
    failed = finished_reply(browser, 0)
    assert failed.get_attribute("data-error") == "true"
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_reply(server, [{"role": "user", "content": question}], max_tokens=100000)
    assert refused.value.code == 400
    message = json.loads(refused.value.read())["error"]["message"]
    assert message in failed.find_element(By.CSS_SELECTOR, ".error").text

    # The failed turn left the history and went back to the message box: fix the setting and resend.
    assert browser.find_element(By.ID, "message").get_attribute("value") == question
    set_max_tokens(browser, MAX_TOKENS)
    browser.find_element(By.ID, "send").click()
    retried = finished_reply(browser, 1)
    assert retried.get_attribute("data-error") is None, retried.text
    assert shown_text(retried) == api_reply(server, [{"role": "user", "content": question}])


def test_a_pasted_image_attaches_and_can_be_removed(browser, server):
    open_page(browser, server)
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const clipboard = new DataTransfer();
        clipboard.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
        document.getElementById("message").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: clipboard, bubbles: true}));
    """, data_url(server.images[1]).partition(",")[2])
    preview = browser.find_element(By.ID, "attachment-preview")
    WebDriverWait(browser, 5).until(lambda d: preview.get_attribute("src") == data_url(server.images[1]))
    browser.find_element(By.ID, "remove-image").click()
    assert not browser.find_element(By.ID, "attachment").is_displayed()


def test_events_split_across_network_chunks_parse_whole(browser, server):
    open_page(browser, server)
    chunks = ['data: {"a"', ':1}\r\n', '\r\ndata: [DO', 'NE]\n', '\n']
    events = browser.execute_async_script("""
        const [chunks, done] = arguments;
        const encoder = new TextEncoder();
        const body = new ReadableStream({start(c) { chunks.forEach(p => c.enqueue(encoder.encode(p))); c.close(); }});
        (async () => { const out = []; for await (const data of sseData(body)) out.push(data); done(out); })();
    """, chunks)
    assert events == ['{"a":1}', "[DONE]"]
