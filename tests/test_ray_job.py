"""The README's main job and the `ray job submit` example, end to end (slow-ish: each
starts its own Ray)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privatelora.placement.cluster import auth_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_runs_in_under_three_minutes():
    t0 = time.time()
    r = subprocess.run([str(BIN / "privatelora"), "demo", "--users", "4", "--json"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **auth_env()})
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert len(out["users"]) == 4 and all(u["text"] for u in out["users"])
    assert out["tokens_per_s"] > 0 and out["mean_batch_size"] > 1 and 0.5 < out["reduction"] < 1
    assert elapsed < 180, f"demo took {elapsed:.0f}s"


@pytest.fixture
def ray_head():
    env = {**os.environ, **auth_env()}
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--resources", json.dumps({"privatelora_cloud": 8, "privatelora_edge": 64}),
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=1):
                break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head's dashboard never came up")
    yield url, env
    os.killpg(head.pid, signal.SIGTERM)     # stop the head we started, by its own process group
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_example(ray_head):
    url, env = ray_head
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--",
                        sys.executable, str(ROOT / "examples" / "serve_job.py"), "--users", "3",
                        "--max-new-tokens", "12"], capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("{") and '"users"' in l]
    assert line, r.stdout[-2000:]
    out = json.loads(line[-1])
    assert out["mode"] == "ray" and len(out["users"]) == 3 and out["tokens"] > 0
