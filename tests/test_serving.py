"""transformers' own server, `transformers serve --continuous-batching`, answers for a saved PT model as its greedy
generate() does."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helpers import SUPPORT, child_env, free_port
from test_hub import save_tiny_model, tiny_tokenizer


pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
START_TIMEOUT_S = 120  # load and bind on 2 contended cores
REQUEST_TIMEOUT_S = 60


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def wait_until_up(server: subprocess.Popen, url: str, log):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail(f"the server did not answer {url} within {START_TIMEOUT_S}s")


def test_serve_with_continuous_batching_answers_as_greedy_generate(tmp_path):
    tokenizer = tiny_tokenizer()
    model = save_tiny_model(tmp_path, seed=0, tokenizer=tokenizer)
    prompt, max_tokens = "the king", 8
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(prompt_ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    expected_text = tokenizer.decode(expected[0, prompt_ids.shape[1]:], skip_special_tokens=True)

    port = free_port()
    # a paged cache sized for one request: unsized, it is sized from the free memory of an accelerator
    command = [sys.executable, str(SUPPORT / "serve_pt.py"), "--continuous-batching", "--cb-num-blocks", "16",
               "--cb-max-batch-tokens", "64", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               str(tmp_path)]
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, env=child_env(), stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/health", log)
        answer = post(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": str(tmp_path), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)  # the server and anything it started
        except ProcessLookupError:  # it exited, and so did all of its group
            pass
        server.wait(timeout=30)
    assert answer["object"] == "text_completion"
    assert answer["usage"] == {"prompt_tokens": prompt_ids.shape[1], "completion_tokens": max_tokens,
                               "total_tokens": prompt_ids.shape[1] + max_tokens}
    assert answer["choices"][0]["text"] == expected_text
