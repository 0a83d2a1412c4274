"""The Python API (engines/pipeline.py) and `fusion-export serve`, driven by the official `openai` client over
loopback: the same tokens as the Python API and the CLI for a request and seed, streaming in OpenAI's chunk
format, concurrent requests answered as each is alone, every bad request a 4xx naming its field or limit, and a
SIGTERM during a stream ending the stream and the process (exit 0)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import DEMO_IMAGE, ROOT, run_main

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

QUESTION = "What is in front of the house?"
OTHER = "Count the boxes, then name their colours."
TOKENS = 12
DATA_URL = "data:image/png;base64," + base64.b64encode(Path(DEMO_IMAGE).read_bytes()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(export_demo):
    from engines.pipeline import Pipeline

    return Pipeline.open(export_demo("trt-10.3"))


@pytest.fixture(scope="module")
def server(pipeline, tmp_path_factory):
    """The app on uvicorn in this process, on a free loopback port, with an API key and a small queue."""
    from fusion_export_cli.server.app import ServerSettings, create_app
    from fusion_export_cli.server.chat import Limits

    images = tmp_path_factory.mktemp("images")
    Image.open(DEMO_IMAGE).save(images / "demo.png")
    limits = Limits(max_tokens=64, image_folder=images, max_image_bytes=100_000)
    settings = ServerSettings(model_id="fusion-demo", limits=limits, api_key="sesame", max_queue=4,
                              max_body_bytes=1_000_000)  # fmt: skip
    port = _free_port()
    config = uvicorn.Config(create_app(pipeline, settings), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", images
    instance.should_exit = True
    thread.join(30)


def _client(base: str, key: str = "sesame"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _messages(question: str = QUESTION, url: str = DATA_URL) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


def test_python_api_takes_every_image_form(pipeline):
    """A path, its bytes, a PIL image and an array are the same image; the stream's pieces are the answer."""
    by_path = pipeline.generate(DEMO_IMAGE, QUESTION, max_new_tokens=TOKENS)
    assert by_path.finish_reason in ("stop", "length") and len(by_path.token_ids) <= TOKENS and by_path.text
    assert by_path.timings["prefill_s"] > 0 and by_path.prompt_positions > 0
    image = Image.open(DEMO_IMAGE).convert("RGB")
    for form in (Path(DEMO_IMAGE).read_bytes(), image, np.asarray(image)):
        assert pipeline.generate(form, QUESTION, max_new_tokens=TOKENS).token_ids == by_path.token_ids
    assert "".join(pipeline.stream(DEMO_IMAGE, QUESTION, max_new_tokens=TOKENS)) == by_path.text
    sampled = pipeline.generate(DEMO_IMAGE, QUESTION, max_new_tokens=TOKENS, temperature=0.9, seed=7)
    assert sampled.token_ids == pipeline.generate(DEMO_IMAGE, QUESTION, max_new_tokens=TOKENS, temperature=0.9,
                                                  seed=7).token_ids  # fmt: skip
    from reference_model.errors import FusionError

    with pytest.raises(FusionError, match="image array of shape \\(4, 4\\) and dtype float64"):
        pipeline.generate(np.zeros((4, 4)), QUESTION)
    with pytest.raises(FusionError, match="image bytes \\(3 bytes\\): not a readable image"):
        pipeline.generate(b"abc", QUESTION)


def test_openai_client_gets_the_python_api_and_cli_tokens(server, pipeline, export_demo):
    base, _ = server
    client = _client(base)
    assert [m.id for m in client.models.list()] == ["fusion-demo"]
    alone = pipeline.generate(DEMO_IMAGE, QUESTION, max_new_tokens=TOKENS, temperature=0.8, seed=3)
    reply = client.chat.completions.create(model="fusion-demo", messages=_messages(), max_tokens=TOKENS,
                                           temperature=0.8, seed=3)  # fmt: skip
    assert reply.choices[0].message.content == alone.text and reply.choices[0].finish_reason == alone.finish_reason
    assert reply.usage.completion_tokens == len(alone.token_ids)
    assert reply.usage.prompt_tokens == alone.prompt_positions
    art = str(export_demo("trt-10.3"))
    cli = run_main("generate", "--artifacts", art, "--image", str(DEMO_IMAGE), "--question", QUESTION,
                   "--max-new-tokens", str(TOKENS), "--temperature", "0.8", "--seed", "3", "--quiet")  # fmt: skip
    assert cli.returncode == 0 and cli.stdout.rstrip("\n") == alone.text

    stream = client.chat.completions.create(model="fusion-demo", messages=_messages(), max_tokens=TOKENS,
                                            temperature=0.8, seed=3, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone.text and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == alone.finish_reason
    assert chunks[-1].usage.completion_tokens == len(alone.token_ids) and not chunks[-1].choices


def test_concurrent_requests_answer_as_each_alone(server, pipeline):
    base, _ = server
    client = _client(base)
    alone = {q: pipeline.generate(DEMO_IMAGE, q, max_new_tokens=TOKENS, temperature=0).text for q in (QUESTION, OTHER)}

    def ask(question: str) -> str:
        reply = client.chat.completions.create(model="fusion-demo", messages=_messages(question), max_tokens=TOKENS,
                                               temperature=0)  # fmt: skip
        return reply.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [QUESTION, OTHER, OTHER, QUESTION]))
    assert answers == [alone[QUESTION], alone[OTHER], alone[OTHER], alone[QUESTION]]


def test_bad_requests_are_4xx_naming_the_fault(server):
    import httpx2 as httpx

    base, images = server
    client = _client(base)
    cases = [
        (dict(messages=_messages(url="https://example.com/cat.png")), 400, "no outbound connection"),
        (dict(messages=_messages(url="data:image/png;base64,@@@")), 400, "not valid base64"),
        (dict(messages=_messages(url="../../etc/passwd")), 403, "outside the folder"),
        (dict(messages=_messages(question="   ")), 400, "no question text"),
        (dict(messages=_messages(), max_tokens=65), 400, "max_tokens 65: this server generates at most 64"),
        (dict(messages=_messages(), extra_body={"frequency_penalty": 1}), 400, "frequency_penalty"),
        (dict(messages=[{"role": "system", "content": "be terse"}, *_messages()]), 400, "system"),
        (dict(messages=_messages(url="data:image/png;base64," + base64.b64encode(b"not a png").decode())), 400,
         "not a readable image"),
    ]  # fmt: skip
    for kwargs, status, words in cases:
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(model="fusion-demo", **{"max_tokens": 4, **kwargs})
        assert error.value.status_code == status and words in error.value.message, (kwargs, error.value.message)
    big = "data:image/png;base64," + base64.b64encode(os.urandom(200_000)).decode()
    with pytest.raises(openai.APIStatusError, match="the image is over 100000 bytes") as error:
        client.chat.completions.create(model="fusion-demo", messages=_messages(url=big), max_tokens=2)
    assert error.value.status_code == 413
    huge = "data:image/png;base64," + base64.b64encode(os.urandom(800_000)).decode()
    with pytest.raises(openai.APIStatusError, match="the request body is over 1000000 bytes") as error:
        client.chat.completions.create(model="fusion-demo", messages=_messages(url=huge), max_tokens=2)
    assert error.value.status_code == 413
    ok = client.chat.completions.create(model="fusion-demo", messages=_messages(url="demo.png"), max_tokens=2)
    assert ok.choices[0].message.content is not None  # a file under --allow-images-from
    with pytest.raises(openai.NotFoundError, match="this server holds 'fusion-demo'"):
        client.chat.completions.create(model="gpt-4o", messages=_messages(), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").models.list()
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base}/ready").status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert 'fusion_requests_total{status="400"}' in metrics and "fusion_time_to_first_token_seconds_count" in metrics


def test_conversations_continue_from_the_kept_turn(server, pipeline):
    """A chat client's second and third turns (the whole history resent, as OpenAI clients do): the answers are the
    Python API conversation's; the server continued its kept state (metrics), and a history it does not hold (an
    edited answer) is recomputed from its text, as a Conversation given that history answers. Malformed
    conversations are 4xx naming the fault."""
    import httpx2 as httpx

    base, _ = server
    client = _client(base)
    questions = [QUESTION, "And what colour is it?", "Why?"]
    chat = pipeline.conversation(DEMO_IMAGE)
    answers = [chat.ask(q, max_new_tokens=TOKENS) for q in questions]
    expected = [a.text for a in answers]
    messages, got = [], []
    for k, question in enumerate(questions):
        messages += _messages(question) if k == 0 else [{"role": "user", "content": question}]
        reply = client.chat.completions.create(model="fusion-demo", messages=messages, max_tokens=TOKENS,
                                               temperature=0)  # fmt: skip
        got.append(reply.choices[0].message.content)
        messages.append({"role": "assistant", "content": got[-1]})
    assert got == expected
    assert reply.usage.prompt_tokens == answers[2].prompt_positions  # the whole conversation's positions
    metrics = httpx.get(f"{base}/metrics").text
    assert 'fusion_conversation_turns_total{state="kept"} 2.0' in metrics
    edited = [*messages[:1], {"role": "assistant", "content": "A house."}, {"role": "user", "content": questions[1]}]
    reply = client.chat.completions.create(model="fusion-demo", messages=edited, max_tokens=TOKENS, temperature=0)
    history = [(QUESTION, "A house.")]
    assert reply.choices[0].message.content == pipeline.conversation(DEMO_IMAGE, history).ask(
        questions[1], max_new_tokens=TOKENS).text  # fmt: skip
    assert 'fusion_conversation_turns_total{state="recomputed"} 1.0' in httpx.get(f"{base}/metrics").text
    second_image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    cases = [
        ([{"role": "assistant", "content": "Hi."}, *_messages()], "alternates user and assistant"),
        ([*_messages(), {"role": "assistant", "content": "A house."}], "alternates user and assistant"),
        ([*_messages(), {"role": "assistant", "content": "A house."},
          {"role": "user", "content": [second_image, {"type": "text", "text": "And this?"}]}], "the one image"),
        ([*_messages(), {"role": "assistant", "content": "A house."}, {"role": "user", "content": " "}],
         r"messages\[2\].content: no question text"),
    ]  # fmt: skip
    for conversation, words in cases:
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model="fusion-demo", messages=conversation, max_tokens=2)


def test_a_runtime_fault_is_a_500_and_the_server_goes_on(server, pipeline, monkeypatch):
    """A batch that raises what no limit explains (a runtime's own error) answers its request 500 and the worker
    takes the next request; a later turn whose history runs past the model's positions is a 400 naming them."""
    base, _ = server
    client = _client(base)

    def broken(*args, **kwargs):
        raise RuntimeError("the runtime fell over")

    monkeypatch.setattr(pipeline, "open_session", broken)
    with pytest.raises(openai.InternalServerError, match="the runtime fell over"):
        client.chat.completions.create(model="fusion-demo", messages=_messages(), max_tokens=2)
    monkeypatch.undo()
    assert client.chat.completions.create(model="fusion-demo", messages=_messages(), max_tokens=2).choices
    long = [*_messages(), {"role": "assistant", "content": "word " * 3000}, {"role": "user", "content": "And?"}]
    with pytest.raises(openai.BadRequestError, match="positions"):
        client.chat.completions.create(model="fusion-demo", messages=long, max_tokens=2)


def test_serve_stops_on_sigterm_during_a_stream(export_demo, tmp_path):
    """A real `fusion-export serve` process: SIGTERM while a client streams ends the stream and the process, 0."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "fusion_export_cli.cli", "serve", str(export_demo("trt-10.3")), "--port",
               str(port), "--model-id", "demo", "--shutdown-timeout", "5"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = _client(f"http://127.0.0.1:{port}")
        for _ in range(600):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = client.chat.completions.create(model="demo", messages=_messages(), max_tokens=64, stream=True,
                                                temperature=0)  # fmt: skip
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        process.send_signal(signal.SIGTERM)
        rest = list(stream)  # in flight: finished within --shutdown-timeout (or cut there), never left hanging
        reasons = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
        assert reasons in ([], ["stop"], ["length"])
        assert process.wait(timeout=30) == 0, process.stderr.read()
        with pytest.raises(openai.APIConnectionError):  # and nothing listens any more
            client.models.list()
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_strings_end_the_answer_there(server, pipeline):
    base, _ = server
    alone = pipeline.generate(DEMO_IMAGE, QUESTION, max_new_tokens=TOKENS, temperature=0)
    stop = alone.text[4:6]
    assert len(stop) == 2 and alone.finish_reason == "length"
    reply = _client(base).chat.completions.create(model="fusion-demo", messages=_messages(), max_tokens=TOKENS,
                                                  temperature=0, stop=[stop])  # fmt: skip
    assert reply.choices[0].message.content == alone.text[: alone.text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_a_full_queue_answers_429_with_retry_after():
    from fusion_export_cli.server.app import Metrics
    from fusion_export_cli.server.chat import ApiError
    from fusion_export_cli.server.worker import Worker

    worker = Worker(pipeline=None, max_queue=2, metrics=Metrics())  # not started: nothing leaves the queue
    worker.submit(object())
    worker.submit(object())
    with pytest.raises(ApiError) as error:
        worker.submit(object())
    assert error.value.status == 429 and error.value.headers == {"Retry-After": "1"} and "2 requests waiting" in str(
        error.value)  # fmt: skip


def test_stop_strings_split_over_tokens_are_never_half_sent():
    from fusion_export_cli.server.worker import StopScanner

    scanner = StopScanner(["bcd", "xy"])
    assert scanner.feed("ab") == ("a", False)  # "b" may start "bcd": held back
    assert scanner.feed("c") == ("", False)
    assert scanner.feed("e") == ("bce", False)  # not a stop after all: sent
    assert scanner.feed("xbc") == ("x", False) and scanner.feed("d!") == ("", True)  # "bc" held, then the stop
    scanner = StopScanner(["end"])
    assert scanner.feed("the e") == ("the ", False) and scanner.rest() == "e"


def _readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python, and over HTTP") :]
    section = section[: section.index("\n## ", 1)]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_examples_run(demo_checkpoint, server):
    """The README's Python API example on the demo checkpoint, and its client example against the test server."""
    api, client = _readme_examples()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = api.replace("demo-output/tiny-random-fusion", str(demo_checkpoint))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (" length [" in result.stdout or " stop [" in result.stdout) and "s prefill" in result.stdout
    assert "turn 2: " in result.stdout
    base, _ = server
    code = client.replace("http://127.0.0.1:8000/v1", f"{base}/v1").replace('"unused"', '"sesame"')
    code = code.replace('model="tiny-random-fusion"', 'model="fusion-demo"')
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_load_and_soak_script_runs(export_demo, tmp_path):
    """benchmarks/serve_load.py from outside a real server process: a short load run (its report's shape), and a
    short soak whose bad requests are all 4xx and good ones never 5xx."""
    import json

    from benchmarks.serve_load import main

    art = str(export_demo("trt-10.3"))
    assert main([art, "--out", str(tmp_path / "load.json"), "--clients", "1,2", "--requests", "1",
                 "--new-tokens", "4"]) == 0  # fmt: skip
    load = json.loads((tmp_path / "load.json").read_text())
    assert [r["clients"] for r in load["runs"]] == [1, 2] and load["runs"][1]["generated_tokens"] > 0
    assert load["server_exit"] == 0
    assert main([art, "--out", str(tmp_path / "soak.json"), "--soak", "--soak-requests", "16", "--soak-clients", "4",
                 "--new-tokens", "4"]) == 0  # fmt: skip
    soak = json.loads((tmp_path / "soak.json").read_text())["soak"]
    assert soak["good_5xx"] == 0 and soak["bad_not_4xx"] == 0 and soak["rss_end"] > 0
    assert sum(sum(by_status.values()) for by_status in soak["statuses"].values()) == 16
