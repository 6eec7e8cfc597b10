"""`ray job submit` to a `ray start --head` cluster on loopback, with token authentication on."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from jobs import Manifest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_matching(pattern: str) -> None:
    """End every process whose command line holds `pattern` (our cluster's own temp folder)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        subprocess.run(["pkill", f"-{sig.name[3:]}", "-f", pattern], check=False)
        time.sleep(2)


def submit(env: dict, address: str, *command: str, attempts: int = 12) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is still starting (`ray start` returns before)."""
    for _ in range(attempts):
        p = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", *command],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in p.stderr:
            return p
        time.sleep(5)
    return p


@pytest.fixture(scope="module")
def head(demo_cache):
    temp = tempfile.mkdtemp(prefix="tray")  # short: Ray's socket paths live under it
    dash = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               TESSERA_CACHE=str(demo_cache))
    start = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             "--dashboard-agent-listen-port=0",  # no fixed port a lingering agent could still hold
             f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        kill_matching(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_job_submitted_to_a_head_node_renders(head, tmp_path):
    env, address = head
    out = tmp_path / "out"
    p = submit(env, address, "python", "run.py", "cluster=ray", "model=demo_random", "job=smoke", "job.width=128",
               "job.height=96", "job.steps=2", f"output.dir={out}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "1 image(s) written, 0 failed" in p.stdout
    (row,) = Manifest(out).rows()
    assert row["status"] == "ok" and (out / row["path"]).is_file()


def test_a_client_with_a_wrong_token_is_refused(head):
    env, address = head
    p = subprocess.run(["ray", "job", "list", "--address", address], env=dict(env, RAY_AUTH_TOKEN="wrong"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Invalid authentication token" in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
