"""The README's code examples, run: each ```python block against a real server (or the
``Runtime`` it builds), each ```toml block through the config loader, each ``giris …``
line of a ```sh block through the CLI's own parser. A README example that drifts from
the code fails here, not in a reader's hands.

A block that is not meant to run (a fragment) says so with ``<!-- fragment -->`` on the
line before its fence. What the test may change in an example is listed below, and
nothing else: its placeholders.
"""
from __future__ import annotations

import ast
import builtins
import re
import shlex
import socket
import time

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from giris.runtime.client import AudioChunk, Client, Frame
from giris.runtime.config import default_config, from_mapping, load, to_mapping, tomllib
from giris.runtime.errors import GirisError
from giris.supervisor import cli
from tests.conftest import ROOT, Server

README = ROOT / "README.md"
FRAGMENT = "<!-- fragment -->"

#: an example's endpoint is a placeholder: the test server's of the same transport
ENDPOINT = re.compile(r'"((?:ipc|tcp)://[^"]*)"')
#: the names an example leaves to its reader, given to a block that reads them unbound: a
#: media player, and for the SDK's later example the session and import of the first
READER = frozenset({"player", "session", "AudioChunk"})


@dataclass
class Block:
    lang: str
    code: str
    line: int  #: of the opening fence, 1-based

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(*langs: str) -> list[Block]:
    """The fenced blocks in these languages (list items' indented ones too), fragments left out."""
    lines = README.read_text().split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2)
        end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
        fragment = i > 0 and lines[i - 1].strip() == FRAGMENT
        if lang in langs and not fragment:
            out.append(Block(lang, "\n".join(x[indent:] for x in lines[i + 1:end]), i + 1))
        i = end + 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- python ---------------------------------------------------------------------------

class Player:
    """The media player the SDK example hands its items to: it keeps what it was given."""

    def __init__(self) -> None:
        self.audio: list[tuple[Any, float]] = []
        self.video: list[tuple[Any, float]] = []

    def queue_audio(self, pcm: Any, at: float) -> None:
        self.audio.append((pcm.copy(), at))

    def queue_video(self, image: Any, at: float) -> None:
        self.video.append((image.copy(), at))


def free_names(code: str) -> set[str]:
    """Names a block reads but never binds (nor imports): what it expects from its reader."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def run_block(code: str, namespace: dict[str, Any]) -> Any:
    """Exec ``code`` in ``namespace``; the value of its last line when that is an expression."""
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "README.md", "exec"), namespace)
    if last is not None:
        return eval(compile(ast.Expression(last.value), "README.md", "eval"), namespace)
    return None


@pytest.fixture(scope="module")
def ipc_server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("readme_ipc"), {})
    try:
        srv.wait_serving()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def curve_dir(tmp_path_factory) -> Path:
    """The keys *Remote clients: CURVE* makes, with its own ``giris keys`` lines: the
    server's pair, alice's pair in ``./alice``, and the allow-list of public keys."""
    d = tmp_path_factory.mktemp("readme_curve")
    assert cli.main(["keys", "--dir", str(d), "--name", "server"]) == 0
    assert cli.main(["keys", "--dir", str(d / "alice"), "--name", "alice"]) == 0
    (d / "clients").mkdir()
    (d / "clients" / "alice.key").write_bytes((d / "alice" / "alice.key").read_bytes())
    return d


@pytest.fixture(scope="module")
def tcp_server(tmp_path_factory, curve_dir: Path) -> Iterator[Server]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    srv = Server(tmp_path_factory.mktemp("readme_tcp"), {"server": {
        "endpoint": endpoint, "curve_secret_key": str(curve_dir / "server.key_secret"),
        "curve_client_keys": str(curve_dir / "clients")}})
    srv.endpoint = endpoint
    try:
        c = Client(endpoint, server_key=str(curve_dir / "server.key"),
                   client_keys=str(curve_dir / "alice" / "alice.key_secret"), timeout=20)
        srv.clients.append(c)
        deadline = time.monotonic() + 60
        while c.status(timeout=5)["state"] != "serving":
            assert time.monotonic() < deadline, srv.logs()
            time.sleep(0.1)
        yield srv
    finally:
        srv.stop()


PYTHON = readme_blocks("python")


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_example_runs(block: Block, request: pytest.FixtureRequest, monkeypatch) -> None:
    code = block.code
    # the placeholders: an endpoint is the test server's; a relative file name is one the
    # README made before the example (the CURVE keys), found from the folder they are in
    for endpoint in ENDPOINT.findall(code):
        server = request.getfixturevalue("tcp_server" if endpoint.startswith("tcp") else "ipc_server")
        code = code.replace(f'"{endpoint}"', f'"{server.endpoint}"')
        if endpoint.startswith("tcp"):
            monkeypatch.chdir(request.getfixturevalue("curve_dir"))
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    wanted = free_names(code)
    unknown = wanted - READER
    assert not unknown, f"{block.id}: names the example never defines: {sorted(unknown)}"
    if "player" in wanted:
        namespace["player"] = Player()
    if "AudioChunk" in wanted:
        namespace["AudioChunk"] = AudioChunk
    if "session" in wanted:
        client = request.getfixturevalue("ipc_server").client()
        namespace["session"] = client.open_session()

    value = None
    try:
        value = run_block(code, namespace)
        check_result(block, namespace, value)
    finally:
        for v in [*namespace.values(), value]:
            if isinstance(v, Client):
                v.close()
        if "session" in wanted:
            namespace["session"].close()


def check_result(block: Block, ns: dict[str, Any], value: Any) -> None:
    """What the example promises, checked on what it left: its player fed audio and video
    on one clock, its frames images, its client one that reaches the server."""
    if "player" in ns:
        player = ns["player"]
        assert player.audio and player.video, block.id
        assert player.video[0][0].ndim == 3 and player.video[0][0].shape[2] == 3
        assert [at for _, at in player.video] == sorted(at for _, at in player.video)
    if "frames" in ns:
        assert ns["frames"] and all(f.image.ndim == 3 for f in ns["frames"]), block.id
    if "idle" in ns:  # the idle queued behind the speech, and it streams
        items = iter(ns["idle"])
        assert any(isinstance(next(items), Frame) for _ in range(50)), block.id
        ns["idle"].stop()
    if isinstance(value, Client):
        assert value.status()["state"] == "serving", block.id


# --- toml -----------------------------------------------------------------------------

#: a ``key = value`` inside a comment documents a key of the comment's section
COMMENTED_KEY = re.compile(r'((?:[A-Za-z_]\w*|"[^"]+")\s*=\s*(?:"[^"]*"|\[\]|[\w.]+))')
#: a ``key value`` in a section header's comment documents a key and its default
DEFAULT_KEY = re.compile(r'\b([a-z]\w*)\s+("[^"]*"|\d[\d.]*\b)')


def commented_keys(code: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The keys the block's comments name, by section: its ``key = value`` examples, and
    the ``key default`` pairs of a header's comment (the header line and the comment-only
    lines under it)."""
    examples: dict[str, dict[str, Any]] = {}
    header: dict[str, str] = {}
    section, in_header = "", False
    for line in code.split("\n"):
        body, _, comment = line.partition("#")
        m = re.match(r"\s*\[([^\]]+)\]", body)
        if m:
            section, in_header = m.group(1), True
        elif body.strip():
            in_header = False
        if in_header:
            header[section] = header.get(section, "") + " " + comment
        for pair in COMMENTED_KEY.findall(comment):
            examples.setdefault(section, {}).update(tomllib.loads(pair))
    defaults = {sec: {k: tomllib.loads(f"v = {v}")["v"] for k, v in DEFAULT_KEY.findall(text)}
                for sec, text in header.items()}
    return examples, {sec: d for sec, d in defaults.items() if d}


def nest(data: dict[str, Any], section: str, values: dict[str, Any]) -> None:
    table = data
    for part in section.split("."):
        table = table.setdefault(part, {})
    table.update(values)


TOML = readme_blocks("toml")


@pytest.mark.parametrize("block", TOML, ids=[b.id for b in TOML])
def test_toml_example_loads(block: Block) -> None:
    data = tomllib.loads(block.code)
    from_mapping(data)  # a key that does not exist, or a value out of range, raises
    examples, defaults = commented_keys(block.code)
    for section, values in [*examples.items(), *defaults.items()]:
        nest(data, section, values)
    from_mapping(data)  # and so does one its comments name
    built_in = to_mapping(default_config())
    for section, values in defaults.items():
        assert {k: built_in[section][k] for k in values} == values, f"{block.id}: [{section}] defaults"


def test_commented_keys_are_read() -> None:
    """The comments' keys are seen, so a documented key that is gone fails the test above."""
    code = ('[server]  # also: ipc_mode = 0o600, nope = "x"\n[budgets] # "cuda:0" = "2GiB"\n'
            '[timeouts]  # worker_start 180,\n  # client_idle 30 (0 = off)\nrequest = 5  # past 64')
    examples, defaults = commented_keys(code)
    assert examples == {"server": {"ipc_mode": 0o600, "nope": "x"}, "budgets": {"cuda:0": "2GiB"}}
    assert defaults == {"timeouts": {"worker_start": 180, "client_idle": 30}}
    with pytest.raises(ValueError, match="nope"):
        data: dict[str, Any] = {}
        nest(data, "server", examples["server"])
        from_mapping(data)


# --- sh -------------------------------------------------------------------------------

#: a synopsis's metavariables, each given a value of its kind
METAVARS = {"N": "9464", "S": "5", "FILE": "path/to/file", "URL": "ipc:///tmp/giris.sock"}


def giris_commands(code: str) -> list[list[str]]:
    """Each ``giris`` command line of a shell block as its argv (after ``giris``).

    A synopsis is read as one use of it: ``[…]`` is optional text taken as written, ``a | b``
    inside it is the first choice, ``...`` (more of the same) is dropped, a metavariable
    (``N``, ``FILE``) takes a value of its kind (``METAVARS``), and an indented
    line that opens with ``[`` continues the line above."""
    lines: list[str] = []
    for line in code.split("\n"):
        if lines and re.match(r"\s+\[", line):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    out: list[list[str]] = []
    for line in lines:
        line = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split(" | ")[0], line)
        words = [METAVARS.get(w, w) for w in shlex.split(line, comments=True) if w not in ("...", "…")]
        command: list[str] = []
        for w in words + ["&&"]:
            if w not in ("&&", "||", ";", "|"):
                command.append(w)
                continue
            while command and command[0] == "sudo":  # sudo [-u USER] CMD
                command = command[3:] if command[1:2] == ["-u"] else command[1:]
            if command and Path(command[0]).name == "giris":
                out.append(command[1:])
            command = []
    return out


SH = [b for b in readme_blocks("sh", "bash", "console", "shell") if giris_commands(b.code)]


@pytest.mark.parametrize("block", SH, ids=[b.id for b in SH])
def test_giris_command_lines_parse(block: Block, capsys) -> None:
    for argv in giris_commands(block.code):
        try:
            args = cli.parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{block.id}: giris {shlex.join(argv)}: {capsys.readouterr().err.strip()}")
        config = getattr(args, "config", None)
        if config and (ROOT / config).is_file():  # a config the repo ships: it loads
            load(ROOT / config)


def test_synopsis_reading() -> None:
    code = ('giris say "Hi" -o a.mp4 [--voice joe | x.onnx]\n'
            '          [--quiet] [--size N]   # a note\n'
            'sudo -u giris giris --log-json status ...  && giris keys --dir ./a\n'
            'systemctl status giris')
    assert giris_commands(code) == [
        ["say", "Hi", "-o", "a.mp4", "--voice", "joe", "--quiet", "--size", "9464"],
        ["--log-json", "status"], ["keys", "--dir", "./a"]]
