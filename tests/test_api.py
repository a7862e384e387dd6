"""The device's OpenAI-compatible API (`privatelora api`), driven by the official `openai`
client as apps drive it.

Against `api --connect` to a running `serve` (its own Ray cluster): the models are listed,
a greedy completion is the text `privatelora generate` gives for the same prompt and
adapter, a chat streams chunk by chunk into the text of the same chat unstreamed, and
malformed requests get 4xx answers with OpenAI's error shape. Against `api` with the
whole split in process: stop strings, seeds, n, several prompts, echo, usage, the API key,
and the context limit."""

import json
import socket
import urllib.error
import urllib.request

import openai
import pytest

from privatelora.cli.main import main
from procs import JsonProc

PROMPT = "ROMEO:\nBut soft, what light"
CHAT = [{"role": "system", "content": "A street in Verona."}, {"role": "user", "content": "Who goes there?"}]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "alice.safetensors"
    assert main(["adapter", "init", "--out", str(path), "--random-scale", "0.3", "--seed", "3", "--json"]) == 0
    return path


def _start_api(*args) -> tuple[JsonProc, str]:
    proc = JsonProc("api", "--port", 0, "--json", *args)
    try:
        ready = proc.wait_for("listening", timeout=120)
    except BaseException:
        proc.stop()
        raise
    return proc, ready["url"]


@pytest.fixture(scope="module")
def served(adapter):
    """`serve` (one replica, a Ray cluster of its own) and `api --connect` to its front door."""
    from privatelora.placement.cluster import auth_env
    serve = JsonProc("serve", "--port", 0, "--json", "--no-metrics", env={**auth_env(), "RAY_ADDRESS": "local"})
    api = None
    try:
        door = serve.wait_for("serving")["front_door"]
        api, url = _start_api("--connect", f"127.0.0.1:{door['port']}", "--adapter", f"alice={adapter}")
        yield url
    finally:
        if api is not None:
            assert api.stop()["rc"] == 0
        serve.stop()


@pytest.fixture(scope="module")
def local(adapter):
    """`api` running the whole split in process, with an API key."""
    api, url = _start_api("--adapter", f"alice={adapter}", "--api-key", "s3cret")
    try:
        yield url
    finally:
        stopped = api.stop()
        assert stopped["rc"] == 0, stopped["stderr"][-2000:]
        assert api.events[-1]["event"] == "stopped" and api.events[-1]["served"] > 0


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def generate(*args) -> dict:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def raw(url, path, body=None, method=None, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- against a running `serve` --------------------------------------------------------------
def test_models_are_the_base_and_the_adapters(served):
    ids = [m.id for m in client(served).models.list().data]
    assert ids == ["tiny", "alice"]
    assert client(served).models.retrieve("alice").id == "alice"


@pytest.mark.parametrize("model", ["tiny", "alice"])
def test_greedy_completion_equals_generate(served, adapter, model):
    want = generate("--prompt", PROMPT, "--max-new-tokens", 24, *(["--adapter", adapter] if model == "alice" else []))
    r = client(served).completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == want["text"]
    assert r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.choices[0].finish_reason == ("length" if want["finish_reason"] == "length" else "stop")


def test_adapters_change_the_output(served):
    texts = {m: client(served).completions.create(model=m, prompt=PROMPT, max_tokens=24, temperature=0)
             .choices[0].text for m in ("tiny", "alice")}
    assert texts["tiny"] != texts["alice"]


def test_chat_streams_chunk_by_chunk(served, adapter):
    c = client(served)
    chunks = list(c.chat.completions.create(model="alice", messages=CHAT, max_tokens=20, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content for ch in chunks[1:] if ch.choices[0].delta.content]
    assert len(pieces) >= 5                       # streamed as generated, not in one piece
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    whole = c.chat.completions.create(model="alice", messages=CHAT, max_tokens=20, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    want = generate("--prompt", CHAT[1]["content"], "--system", CHAT[0]["content"], "--chat",
                    "--max-new-tokens", 20, "--adapter", adapter)
    assert whole.choices[0].message.content == want["text"]
    assert whole.usage.prompt_tokens == want["prompt_tokens"]


def test_malformed_requests_get_openai_errors(served):
    c = client(served)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, temperature=7)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="bob", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, logprobs=2)
    assert e.value.body["code"] == "unsupported_parameter"
    status, body = raw(served, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = raw(served, "/v1/chat/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw(served, "/v1/nothing")
    assert status == 404 and "error" in body
    # the server is unharmed
    assert raw(served, "/health")[1]["status"] == "ok"
    assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


# ---- the whole split in this process --------------------------------------------------------
def test_in_process_split_equals_generate(local):
    c = client(local, "s3cret")
    want = generate("--prompt", PROMPT, "--max-new-tokens", 16)
    assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text \
        == want["text"]
    status, health = raw(local, "/health")
    assert status == 200 and health["cloud"] == "in-process" and health["models"] == ["tiny", "alice"]


def test_the_api_key_is_required(local):
    with pytest.raises(openai.AuthenticationError) as e:
        client(local, "wrong").models.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert raw(local, "/v1/models")[0] == 401
    assert raw(local, "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_stop_strings_cut_the_text_streamed_or_not(local):
    c = client(local, "s3cret")
    full = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[8:11]
    assert stop.strip() and full.index(stop) >= 1
    cut = full[:full.index(stop)]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens < 24
    streamed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                    stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_seeds_choices_prompts_echo_and_usage(local, adapter):
    c = client(local, "s3cret")
    kw = dict(model="alice", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95)
    a = c.completions.create(seed=11, **kw).choices[0].text
    assert c.completions.create(seed=11, **kw).choices[0].text == a
    want = generate("--prompt", PROMPT, "--max-new-tokens", 12, "--temperature", 0.9, "--top-p", 0.95, "--seed", 11,
                    "--adapter", adapter)
    assert a == want["text"]
    two = c.completions.create(seed=11, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text == a
    assert two.choices[1].text != a                   # choice i samples with seed + i
    many = c.completions.create(model="tiny", prompt=["KING:\nNow is the", PROMPT], max_tokens=6, temperature=0,
                                echo=True)
    assert many.choices[1].text.startswith(PROMPT) and many.choices[0].text.startswith("KING:\nNow is the")
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_context_limit_and_token_prompts(local):
    c = client(local, "s3cret")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=600)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt=[5, 6, 99999], max_tokens=2)
    ids = generate("--prompt", PROMPT, "--max-new-tokens", 1)["prompt_tokens"]
    r = c.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4 and ids > 0


def test_a_client_that_goes_away_ends_its_session(local):
    import time
    req = urllib.request.Request(local + "/v1/completions", method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Bearer s3cret"}, data=json.dumps(
        {"model": "alice", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        first = r.readline()
        assert first.startswith(b"data: {")
        assert raw(local, "/health")[1]["active"] == 1
    deadline = time.time() + 20
    while time.time() < deadline:
        health = raw(local, "/health")[1]
        if health["active"] == 0 and health["cloud_sessions"] == 0:
            break
        time.sleep(0.1)
    assert (health["active"], health["cloud_sessions"]) == (0, 0), health


def test_an_unreachable_cloud_is_a_503():
    with socket.socket() as s:            # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api, url = _start_api("--connect", f"127.0.0.1:{port}", "--resume-attempts", 0)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "cloud_unavailable"
        assert str(port) in e.value.body["message"]
        # streamed, the answer has begun (200) when the cloud fails: an error event, which the client raises
        stream = client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True)
        with pytest.raises(openai.APIError) as e:
            list(stream)
        assert "cannot reach the cloud" in str(e.value)
    finally:
        assert api.stop()["rc"] == 0


def test_the_example_app_streams_a_chat(local):
    import subprocess
    import sys
    from pathlib import Path
    app = Path(__file__).resolve().parents[1] / "examples" / "chat_app.py"
    run = subprocess.run([sys.executable, str(app), "--base-url", local + "/v1", "--api-key", "s3cret", "--model",
                          "alice", "--max-tokens", "12", "Who goes there?"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "models on this device: tiny, alice" in run.stderr
    want = client(local, "s3cret").chat.completions.create(
        model="alice", messages=[{"role": "user", "content": "Who goes there?"}], max_tokens=12, temperature=0)
    assert run.stdout == want.choices[0].message.content + "\n"


def test_bad_command_lines_are_one_line_errors(capsys, tmp_path, adapter):
    assert main(["api", "--adapter", "alice"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert main(["api", "--adapter", f"alice={tmp_path / 'none.safetensors'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["api", "--connect", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    other = tmp_path / "r8.safetensors"           # adapters served together share one split
    assert main(["adapter", "init", "--rank", "8", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["api", "--adapter", f"alice={adapter}", "--adapter", f"bob={other}", "--port", "0"]) == 2
    assert "was made for another rank" in capsys.readouterr().err
    template = tmp_path / "missing.jinja"
    assert main(["api", "--chat-template", str(template)]) == 2
    assert "cannot read the chat template" in capsys.readouterr().err
