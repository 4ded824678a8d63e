"""The shipped systemd unit verifies, carries the directives the runtime relies on, and
its config file loads."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from giris.runtime.config import load

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "configs" / "systemd" / "giris.service"
TOML = ROOT / "configs" / "systemd" / "giris.toml"
EXEC_START = "ExecStart=/usr/local/bin/giris serve --config /etc/giris/giris.toml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    true = shutil.which("true")
    assert true
    text = UNIT.read_text()
    assert text.count(EXEC_START) == 1
    # verify insists that ExecStart's binary exists; everything else stays verbatim
    copy = tmp_path / "giris.service"
    copy.write_text(text.replace(EXEC_START, f"ExecStart={true} serve --config /etc/giris/giris.toml"))
    r = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # unknown keys and bad values are only warnings ("..., ignoring"): fail on them too
    problems = [l for l in out.splitlines()
                if "giris.service" in l or "ignoring" in l.lower() or "unknown" in l.lower()]
    assert not problems, out


def test_directives() -> None:
    u = parse_unit(UNIT.read_text())
    unit, svc, inst = u["Unit"], u["Service"], u["Install"]

    def one(section: dict[str, list[str]], key: str) -> str:
        assert key in section, f"{key}= missing"
        return section[key][-1]

    assert int(one(unit, "StartLimitIntervalSec")) > 0 and int(one(unit, "StartLimitBurst")) > 0
    expect = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
        "KillMode": "mixed", "User": "giris", "Group": "giris", "RuntimeDirectory": "giris",
        "RuntimeDirectoryMode": "0750", "StateDirectory": "giris",
        "ExecStart": EXEC_START.split("=", 1)[1], "ExecReload": "/bin/kill -HUP $MAINPID",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "DevicePolicy": "closed",
    }
    for key, value in expect.items():
        assert one(svc, key) == value, key
    assert int(one(svc, "TimeoutStopSec")) > 0
    # the timeouts fit: the watchdog pings at half WatchdogSec; stop waits for the drain
    cfg = load(TOML)
    assert cfg.timeouts.shutdown < int(one(svc, "TimeoutStopSec"))
    assert cfg.timeouts.worker_start < int(one(svc, "TimeoutStartSec"))
    # GPUs stay reachable; /dev/shm stays usable
    allowed = svc["DeviceAllow"]
    for dev in ("char-nvidia* rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"):
        assert dev in allowed
    assert all("*" not in a.split()[0] or not a.startswith("/") for a in allowed), \
        "DeviceAllow= takes no globs in paths"
    assert "PrivateDevices" not in svc or svc["PrivateDevices"][-1] == "no"
    assert "MemoryDenyWriteExecute" not in svc
    assert inst["WantedBy"] == ["multi-user.target"]


def test_config_loads() -> None:
    cfg = load(TOML)
    assert cfg.server.endpoint == "ipc:///run/giris/gateway.sock"
    assert (cfg.server.metrics_host, cfg.server.metrics_port) == ("127.0.0.1", 9464)
    assert list(cfg.stages) == ["tts", "coeffs", "motion", "render"]
    assert [s.engine for s in cfg.stages.values()] == ["piper", "visemes", "prosody", "warp"]
    assert cfg.stages["render"].pool_slot_bytes >= cfg.limits.max_size ** 2 * 3
    assert cfg.budgets["cpu"] == 8 * 1024 ** 3
