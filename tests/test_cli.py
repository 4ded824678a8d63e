"""The ``giris`` command as an operator types it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def giris(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "giris.supervisor.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_status_table_and_json(make_server):
    srv = make_server()
    r = giris("status", "--endpoint", srv.endpoint, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [w["stage"] for w in st["workers"]] == ["tts", "coeffs", "motion", "render"]
    for w in st["workers"]:
        assert w["pid"] > 0 and w["state"] == "ready" and w["restarts"] == 0 and w["cpus"]
    r = giris("status", "--endpoint", srv.endpoint)
    assert r.returncode == 0 and "render" in r.stdout and "test-frames" in r.stdout


def test_status_of_a_missing_server_fails_cleanly(tmp_path: Path):
    # an ipc endpoint with no socket file: said at once, with the path (no timeout wait)
    r = giris("status", "--endpoint", f"ipc://{tmp_path}/nobody.sock")
    assert r.returncode == 2
    assert "server_gone" in r.stderr and "no socket file" in r.stderr and "Traceback" not in r.stderr
    # a tcp endpoint nobody answers: after the timeout
    r = giris("status", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1")
    assert r.returncode == 2
    assert "server_gone" in r.stderr and "Traceback" not in r.stderr


def test_keys_writes_a_pair(tmp_path: Path):
    r = giris("keys", "--dir", str(tmp_path), "--name", "alice")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "alice.key").exists()
    assert (tmp_path / "alice.key_secret").stat().st_mode & 0o077 == 0


def test_the_shipped_configs_load():
    from pathlib import Path

    from giris.runtime.config import load

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.toml"))
    assert {f.name for f in files} >= {"cpu.toml", "gpu.toml", "giris.toml"}
    for f in files:
        cfg = load(f)
        assert list(cfg.stages) == ["tts", "coeffs", "motion", "render"], f
    assert load(root / "gpu.toml").stages["render"].device == "cuda:0"
