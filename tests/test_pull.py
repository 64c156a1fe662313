"""`runner pull`, `runner list`, `runner rm` against a Hub-compatible HTTP server run here.

`LocalHub` serves fixture files on 127.0.0.1 with the routes huggingface_hub 2.4 really calls
(read from its hf_api.py and file_download.py): `GET /api/models/{id}[/revision/{rev}]?blobs=true`
(the listing with sizes, blob ids and LFS sha256), `HEAD/GET /{id}/resolve/{rev}/{file}` (ETag,
X-Repo-Commit, Content-Length; LFS files answer 302 to a "CDN" on another origin, localhost, with
X-Linked-Etag and X-Linked-Size, as the Hub does), and the CDN's `GET /cdn/{sha256}` with Range.
The real `runner` command runs in its own process with HF_ENDPOINT pointing at it and a temporary
HF_HOME: nothing reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RUNNER = Path(sys.executable).with_name("runner")
CATALOG = Path(__file__).parents[1] / "src" / "runner" / "catalog"
TOKEN = "hf_localtesttoken"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, Path]                  # name in the repository -> file on disk
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: int = 0                          # 401 or 403 for downloads without the token; 0: open
    sha256: dict[str, str] = field(default_factory=dict)   # overrides (a sparse file is never hashed)

    def lfs(self, name: str) -> bool:
        return name.endswith((".safetensors", ".bin", ".pth"))

    def sha(self, name: str) -> str:
        if name not in self.sha256:
            self.sha256[name] = hashlib.sha256(self.files[name].read_bytes()).hexdigest()
        return self.sha256[name]

    def blob_id(self, name: str) -> str:
        return git_blob_id(self.files[name].read_bytes())


class LocalHub(http.server.ThreadingHTTPServer):
    """A Hub-compatible endpoint: the listing, resolve and a CDN with Range, plus faults a test
    switches on (a dropped connection, a stall, damaged bytes)."""

    daemon_threads = True

    def __init__(self, address: str = "127.0.0.1") -> None:
        super().__init__((address, 0), HubHandler)
        self.cdn_host = "localhost"     # another origin than the endpoint's, as the Hub's CDN is
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.drop_after: dict[str, list[int]] = {}   # file -> bytes to send before cutting, for the next GETs
        self.hold_after: dict[str, int] = {}      # file -> bytes to send, then stall until `release`
        self.reached = threading.Event()
        self.release = threading.Event()
        self.damaged: set[str] = set()            # files served with one byte changed
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests(self, name: str) -> list[dict]:
        return [entry for entry in self.log if entry.get("file") == name]

    def downloads(self, name: str) -> list[dict]:
        """The GETs of `name`'s bytes (on the CDN for LFS files)."""
        return [e for e in self.requests(name) if e["method"] == "GET" and e["path"].startswith("/cdn/")]

    def served(self, name: str) -> int:
        return sum(entry.get("sent", 0) for entry in self.requests(name))


class HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHub

    def log_message(self, *args) -> None:   # quiet
        pass

    def do_HEAD(self) -> None:
        self.route(head=True)

    def do_GET(self) -> None:
        self.route(head=False)

    # ---- routing -------------------------------------------------------------------------------
    def route(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        entry = {"method": self.command, "path": path, "range": self.headers.get("Range"),
                 "auth": self.headers.get("Authorization")}
        with self.server.lock:
            self.server.log.append(entry)
        if path.startswith("/api/models/"):
            return self.model_info(path[len("/api/models/"):])
        if path.startswith("/cdn/"):
            return self.cdn(path[len("/cdn/"):], head, entry)
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head, entry)
        self.answer(404, {"X-Error-Code": "RepoNotFound"})

    def answer(self, status: int, headers: dict | None = None, body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def model_info(self, rest: str) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.answer(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if revision not in ("", "main", repo.commit):
            return self.answer(404, {"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for name, path in repo.files.items():
            size = path.stat().st_size
            if repo.lfs(name):
                siblings.append({"rfilename": name, "size": size, "blobId": "f" * 40,
                                 "lfs": {"sha256": repo.sha(name), "size": size, "pointerSize": 134}})
            else:
                siblings.append({"rfilename": name, "size": size, "blobId": repo.blob_id(name)})
        body = json.dumps({"id": repo_id, "sha": repo.commit, "private": False,
                           "gated": "manual" if repo.gated else False, "siblings": siblings}).encode()
        self.answer(200, {"Content-Type": "application/json"}, body)

    def resolve(self, repo_id: str, revision: str, name: str, head: bool, entry: dict) -> None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.answer(401, {"X-Error-Code": "RepoNotFound"}, head=head)
        if revision not in ("main", repo.commit):
            return self.answer(404, {"X-Error-Code": "RevisionNotFound"}, head=head)
        if repo.gated and not self.authorized():
            return self.answer(repo.gated, {"X-Error-Code": "GatedRepo",
                                            "X-Error-Message": f"Access to model {repo_id} is restricted."}, head=head)
        if name not in repo.files:
            return self.answer(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, head=head)
        entry["file"] = name
        if repo.lfs(name):
            sha, size = repo.sha(name), repo.files[name].stat().st_size
            cdn = f"http://{self.server.cdn_host}:{self.server.server_address[1]}/cdn/{sha}"
            return self.answer(302, {"Location": cdn, "X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{sha}"',
                                     "X-Linked-Size": size, "ETag": f'"{sha}"'}, head=head)
        self.send_file(repo.files[name], name, {"ETag": f'"{repo.blob_id(name)}"', "X-Repo-Commit": repo.commit},
                       head, entry)

    def cdn(self, sha: str, head: bool, entry: dict) -> None:
        for repo in self.server.repos.values():
            for name in repo.files:
                if repo.lfs(name) and repo.sha(name) == sha:
                    entry["file"] = name
                    return self.send_file(repo.files[name], name, {"ETag": f'"{sha}"'}, head, entry)
        self.answer(404)

    def send_file(self, path: Path, name: str, headers: dict, head: bool, entry: dict) -> None:
        data = path.read_bytes()
        if name in self.server.damaged:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        asked = self.headers.get("Range")
        if asked and asked.startswith("bytes=") and asked.endswith("-"):
            start = int(asked[len("bytes="):-1])
        status = 206 if start else 200
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        body = data[start:]
        cuts = self.server.drop_after.get(name)
        cut = cuts.pop(0) if cuts else None
        hold = self.server.hold_after.pop(name, None)
        limit = cut if cut is not None else hold
        try:
            self.wfile.write(body[:limit] if limit is not None else body)
            entry["sent"] = min(len(body), limit) if limit is not None else len(body)
            if hold is not None:
                self.server.reached.set()
                self.server.release.wait(120)
            if limit is not None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:   # the client went away (killed)
            self.close_connection = True


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def pull_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}   # never the user's token
    env.update({"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "120",
                "HF_TOKEN_PATH": str(Path(env["HF_HOME"]) / "no-token"), **extra})
    return env


def runner(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNNER), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or pull_env())


def safetensors_file(path: Path, tensors: dict[str, int]) -> Path:
    """A valid safetensors file of F32 vectors (name -> length), written by hand (no torch)."""
    header, offset = {}, 0
    for name, length in tensors.items():
        header[name] = {"dtype": "F32", "shape": [length], "data_offsets": [offset, offset + 4 * length]}
        offset += 4 * length
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + os.urandom(offset))
    return path


def small_repo(folder: Path, config: dict | None = None, weights: int = 1000) -> dict[str, Path]:
    """config.json of the tiny Llama of conftest (or `config`) and a small valid safetensors file."""
    from conftest import TINY_LLAMA

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or dict(TINY_LLAMA, model_type="llama", dtype="float32")))
    return {"config.json": folder / "config.json",
            "model.safetensors": safetensors_file(folder / "model.safetensors", {"w": weights})}


@pytest.fixture
def tiny_repo(tiny_llama_dir, tmp_path) -> dict[str, Path]:
    """The tiny Llama of conftest as a Hub repository, with pickles and files runner does not need
    beside it (which must never be requested)."""
    files = {p.name: p for p in sorted(tiny_llama_dir.iterdir()) if p.is_file()}
    extra = tmp_path / "extra"
    extra.mkdir()
    for name, data in (("pytorch_model.bin", b"PK\x03\x04 a pickle"), ("original/consolidated.pth", b"PK\x03\x04"),
                       ("onnx/model.safetensors", b"not needed"), ("README.md", b"# tiny\n")):
        path = extra / name.replace("/", "_")
        path.write_bytes(data)
        files[name] = path
    return files


def snapshot(repo_id: str, commit: str = Repo.commit) -> Path:
    return Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def one_line_error(result: subprocess.CompletedProcess, exit_code: int = 2) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("runner: error: "), result.stderr
    return last


# ---- pull -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pull_then_generate(hub, tiny_repo):
    """A full pull: plan, progress, only the files runner loads, verified; then `runner generate`
    loads it offline from the HF cache by its id."""
    hub.repos["test-org/tiny-chat"] = Repo(dict(tiny_repo))
    result = runner("pull", "test-org/tiny-chat")
    assert result.returncode == 0, result.stderr
    folder = snapshot("test-org/tiny-chat")
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("ready: test-org/tiny-chat, ") and str(folder) in last
    assert last.endswith("next: runner chat test-org/tiny-chat")
    assert "test-org/tiny-chat · cuda" in result.stderr and "the plan's recommendation" in result.stderr
    assert "✔ model.safetensors" in result.stderr and "total" in result.stderr

    wanted = sorted(n for n in tiny_repo if "/" not in n and not n.endswith((".bin", ".md")))
    assert sorted(p.name for p in folder.iterdir()) == wanted
    for name in wanted:
        assert (folder / name).read_bytes() == tiny_repo[name].read_bytes()
    asked = {entry.get("file") for entry in hub.log if entry["method"] == "GET"}
    assert not asked & {"pytorch_model.bin", "original/consolidated.pth", "onnx/model.safetensors", "README.md"}
    assert not any(e["auth"] for e in hub.log if e["path"].startswith("/cdn/"))   # the token stays on the Hub

    generated = runner("generate", "test-org/tiny-chat", "-p", "Hello", "--max-tokens", "4", "--quant", "fp32",
                       env=pull_env(HF_HUB_OFFLINE="1"))
    assert generated.returncode == 0, generated.stderr
    assert "4 tokens" in generated.stderr


def test_pull_again_verifies_without_downloading(hub, tmp_path):
    hub.repos["test-org/small"] = Repo(small_repo(tmp_path / "small"))
    assert runner("pull", "test-org/small").returncode == 0
    hub.log.clear()
    again = runner("pull", "test-org/small")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1].startswith("ready: test-org/small")
    assert not [e for e in hub.log if e["path"].startswith("/cdn/")]   # checked by hashing what is here


@pytest.mark.slow
def test_dropped_connection_resumes_in_the_same_run(hub, tiny_repo):
    hub.repos["test-org/tiny-chat"] = Repo(dict(tiny_repo))
    hub.drop_after["model.safetensors"] = [5_000_000]
    result = runner("pull", "test-org/tiny-chat")
    assert result.returncode == 0, result.stderr
    gets = hub.downloads("model.safetensors")
    assert len(gets) == 2 and gets[0]["range"] is None
    resumed_at = int(gets[1]["range"][len("bytes="):-1])
    assert 0 < resumed_at <= 5_000_000
    size = tiny_repo["model.safetensors"].stat().st_size
    assert hub.served("model.safetensors") == 5_000_000 + size - resumed_at
    assert (snapshot("test-org/tiny-chat") / "model.safetensors").read_bytes() == tiny_repo["model.safetensors"].read_bytes()


def test_network_lost_mid_file_keeps_what_arrived(hub, tmp_path):
    """The connection drops, and the next one brings nothing: one line, exit 2, the bytes kept; the
    next pull asks only for the rest."""
    files = small_repo(tmp_path / "small", weights=3_000_000)
    hub.repos["test-org/small"] = Repo(files)
    hub.drop_after["model.safetensors"] = [5_000_000, 0]
    line = one_line_error(runner("pull", "test-org/small"))
    assert "lost the connection to the Hub while downloading model.safetensors" in line
    assert "kept" in line and "runner pull test-org/small again to resume" in line
    kept = int(hub.downloads("model.safetensors")[-1]["range"][len("bytes="):-1])
    assert kept > 0
    assert runner("pull", "test-org/small").returncode == 0
    assert hub.downloads("model.safetensors")[-1]["range"] == f"bytes={kept}-"
    assert (snapshot("test-org/small") / "model.safetensors").read_bytes() == files["model.safetensors"].read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_pull_resumes_and_is_not_offered_meanwhile(hub, tiny_repo, how):
    """kill -9 or Ctrl-C in the middle of the weights; the partial snapshot is not a model (list,
    load_spec, the picker); the next pull asks only for the missing bytes."""
    from runner.errors import ModelNotFound
    from runner.model import load_spec
    from runner.tui.models import find_models

    hub.repos["test-org/tiny-chat"] = Repo(dict(tiny_repo))
    hub.hold_after["model.safetensors"] = 20_000_000
    process = subprocess.Popen([str(RUNNER), "pull", "test-org/tiny-chat"], env=pull_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.reached.wait(120), "the pull never reached the weights"
        os.kill(process.pid, how)
        _, stderr = process.communicate(timeout=60)
    finally:
        hub.release.set()
        process.kill()
    if how == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == ("runner: interrupted; what arrived is kept: "
                                                   "runner pull test-org/tiny-chat resumes")
    folder = snapshot("test-org/tiny-chat")
    assert (folder / ".runner-pull-incomplete").is_file()
    with pytest.raises(ModelNotFound):
        load_spec("test-org/tiny-chat")
    assert "test-org/tiny-chat" not in [e.name for e in find_models()[0]]
    listed = runner("list", "--json")
    assert [m["state"] for m in json.loads(listed.stdout)["models"] if m["name"] == "test-org/tiny-chat"] == ["partial"]

    first = hub.served("model.safetensors")
    result = runner("pull", "test-org/tiny-chat")
    assert result.returncode == 0, result.stderr
    resumed = [e for e in hub.downloads("model.safetensors") if e["range"]]
    assert len(resumed) == 1
    kept = int(resumed[0]["range"][len("bytes="):-1])
    assert kept >= 10_000_000     # most of what had arrived was kept, not asked for again
    size = tiny_repo["model.safetensors"].stat().st_size
    assert hub.served("model.safetensors") - first == size - kept
    assert load_spec("test-org/tiny-chat").path == folder


def test_damaged_file_is_caught_and_never_ready(hub, tmp_path):
    hub.repos["test-org/small"] = Repo(small_repo(tmp_path / "small", weights=300_000))
    hub.damaged.add("model.safetensors")
    line = one_line_error(runner("pull", "test-org/small"), exit_code=1)
    assert "model.safetensors" in line and "arrived damaged" in line and "sha256" in line
    folder = snapshot("test-org/small")
    assert not (folder / "model.safetensors").exists()
    assert not list((folder.parents[1] / "blobs").glob("*.incomplete"))
    from runner.errors import ModelNotFound
    from runner.model import load_spec

    with pytest.raises(ModelNotFound):
        load_spec("test-org/small")
    hub.damaged.clear()
    assert runner("pull", "test-org/small").returncode == 0
    assert load_spec("test-org/small").path == folder


def test_bad_bytes_kept_from_a_crash_are_downloaded_again(hub, tmp_path):
    files = small_repo(tmp_path / "small", weights=300_000)
    hub.repos["test-org/small"] = Repo(files)
    sha = hub.repos["test-org/small"].sha("model.safetensors")
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--test-org--small" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").write_bytes(os.urandom(100_000))   # not the file's first bytes
    result = runner("pull", "test-org/small")
    assert result.returncode == 0, result.stderr
    gets = [e["range"] for e in hub.downloads("model.safetensors")]
    assert gets == ["bytes=100000-", None]    # resumed, caught by the checksum, fetched again from byte 0
    assert (snapshot("test-org/small") / "model.safetensors").read_bytes() == files["model.safetensors"].read_bytes()


def test_refuses_what_does_not_fit_unless_forced(hub, tmp_path):
    config = json.loads((CATALOG / "meta-llama--Llama-3.1-405B-Instruct.json").read_text())
    hub.repos["test-org/huge"] = Repo(small_repo(tmp_path / "huge", config=config))
    line = one_line_error(runner("pull", "test-org/huge"))
    assert "test-org/huge" in line and ("does not fit" in line or "offload" in line)
    assert "runner pull test-org/huge --force" in line
    assert not (Path(os.environ["HF_HOME"]) / "hub" / "models--test-org--huge").exists()
    assert not [e for e in hub.log if e["path"].startswith("/cdn/")]
    forced = runner("pull", "test-org/huge", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "downloading anyway (--force)" in forced.stderr


def test_refuses_what_the_disk_cannot_hold(hub, tmp_path):
    """The weights are a sparse file larger than the free space of the disk under HF_HOME: the
    listing says so, and nothing is written."""
    files = small_repo(tmp_path / "big")
    free = shutil.disk_usage(tmp_path).free
    with files["model.safetensors"].open("r+b") as file:
        file.truncate(free + 10**9)
    hub.repos["test-org/big"] = Repo(files, sha256={"model.safetensors": "ab" * 32})
    line = one_line_error(runner("pull", "test-org/big"))
    assert "needs" in line and "free" in line and "HF_HOME" in line
    assert not (Path(os.environ["HF_HOME"]) / "hub" / "models--test-org--big").exists()
    assert not [e for e in hub.log if e["path"].startswith("/cdn/")]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, where this machine lets the tests mount one (root in a container)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_refuses_what_a_small_disk_cannot_hold(hub, tmp_path, small_disk):
    """HF_HOME on a 4 MB filesystem: a 2 MB model is pulled, a 6 MB one is refused before a byte."""
    hub.repos["test-org/two-mb"] = Repo(small_repo(tmp_path / "two", weights=500_000))
    hub.repos["test-org/six-mb"] = Repo(small_repo(tmp_path / "six", weights=1_500_000))
    env = pull_env(HF_HOME=str(small_disk / "hf"))
    line = one_line_error(runner("pull", "test-org/six-mb", env=env))
    assert "test-org/six-mb needs 6 MB more" in line and "which has 4." in line and "MB free" in line
    assert not [e for e in hub.log if e["path"].startswith("/cdn/")]
    assert runner("pull", "test-org/two-mb", env=env).returncode == 0


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_says_accept_the_licence(hub, tmp_path, status):
    hub.repos["test-org/gated"] = Repo(small_repo(tmp_path / "gated"), gated=status)
    line = one_line_error(runner("pull", "test-org/gated"))
    assert "gated" in line and "licence" in line and "hf auth login" in line
    with_token = runner("pull", "test-org/gated", env=pull_env(HF_TOKEN=TOKEN))
    assert with_token.returncode == 0, with_token.stderr


def test_no_network_and_bad_names_are_one_line(hub, tmp_path):
    with socket.socket() as probe:     # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    line = one_line_error(runner("pull", "test-org/small", env=pull_env(HF_ENDPOINT=f"http://127.0.0.1:{closed}")))
    assert "cannot reach the Hub" in line
    assert "HF_HUB_OFFLINE" in one_line_error(runner("pull", "test-org/small", env=pull_env(HF_HUB_OFFLINE="1")))
    assert "no such model on the Hub, or it is private" in one_line_error(runner("pull", "test-org/missing"))
    assert "not a Hugging Face model id" in one_line_error(runner("pull", "a/b/c"))
    assert "runner pull needs a Hugging Face model id" in one_line_error(runner("pull", ""))   # not "a local folder"
    assert "local folder" in one_line_error(runner("pull", str(tmp_path)))
    hub.repos["test-org/pickles"] = Repo({"config.json": small_repo(tmp_path / "p")["config.json"],
                                          "pytorch_model.bin": tmp_path / "p" / "model.safetensors"})
    line = one_line_error(runner("pull", "test-org/pickles"))
    assert "no safetensors weights (only pytorch_model.bin)" in line
    assert not [e for e in hub.log if e.get("file") == "pytorch_model.bin"]


def test_a_hub_that_never_answers_is_one_line_not_a_hang(hub):
    with socket.socket() as silent:    # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = pull_env(HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_DOWNLOAD_TIMEOUT="1")
        line = one_line_error(runner("pull", "test-org/small", env=env, timeout=60))
    assert "cannot reach the Hub" in line and "timed out" in line


# ---- list and rm ----------------------------------------------------------------------------------


def derived_cache(kind: str, name: str, source: Path, quant: str) -> Path:
    """A folder as runner_mlx.convert / runner_cuda.fast.nf4_cache write it: files and a record of
    the source (`runner-source.json` / `runner-nf4-cache.json`)."""
    from runner.paths import models_dir

    folder = models_dir() / kind / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 5000)
    record = "runner-source.json" if kind == "mlx" else "runner-nf4-cache.json"
    (folder / record).write_text(json.dumps({"source": str(source), "quant": quant}))
    return folder


@pytest.fixture
def own_home(tmp_path, monkeypatch) -> Path:
    """A RUNNER_HOME of this test only (the built-in model not imported in it)."""
    home = tmp_path / "runner-home"
    monkeypatch.setenv("RUNNER_HOME", str(home))
    return home


def listed(name: str) -> dict:
    result = runner("list", "--json")
    assert result.returncode == 0, result.stderr
    return next(m for m in json.loads(result.stdout)["models"] if m["name"] == name)


def test_list_shows_models_sizes_verdicts_and_caches(hub, tmp_path, own_home):
    hub.repos["test-org/small"] = Repo(small_repo(tmp_path / "small", weights=250_000))
    assert runner("pull", "test-org/small").returncode == 0
    folder = snapshot("test-org/small")
    mlx = derived_cache("mlx", f"{folder.name}-q4", folder, "q4")
    mine = tmp_path / "my-models" / "mine"
    small_repo(mine)
    (own_home / "config").mkdir(parents=True)
    (own_home / "config" / "config.toml").write_text(f'model_dirs = ["{mine.parent}"]\n')
    orphan = derived_cache("nf4-cache", "gone-nf4-0123", tmp_path / "deleted-model", "nf4")

    result = runner("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.startswith("test-org/small"))
    assert "HF cache" in row and "1 MB" in row and "fits · cuda fp32" in row
    from runner.download import human_size
    from runner.store import tree_size

    assert any("└ MLX conversion (q4)" in line and human_size(tree_size(mlx)) in line for line in lines)
    assert any(line.startswith(str(mine)) and "config" in line for line in lines)
    assert any(line.startswith("HuggingFaceTB/SmolLM2-135M-Instruct") and "imported on first use" in line for line in lines)
    assert any(line.endswith(str(orphan)) and "NF4 reload cache (nf4) of " in line for line in lines)
    assert lines[-1].startswith("3 models, ")

    entry = listed("test-org/small")
    hub_bytes = sum(f.stat().st_size for f in (folder.parents[1] / "blobs").iterdir()) + len(Repo.commit)  # + refs/main
    assert entry["state"] == "ready" and entry["size_bytes"] == hub_bytes
    assert [c["path"] for c in entry["caches"]] == [str(mlx)]


def test_rm_asks_removes_what_runner_owns_and_says_what_came_back(hub, tmp_path, own_home):
    hub.repos["test-org/small"] = Repo(small_repo(tmp_path / "small", weights=250_000))
    assert runner("pull", "test-org/small").returncode == 0
    folder = snapshot("test-org/small")
    repo_folder = folder.parents[1]
    mlx = derived_cache("mlx", f"{folder.name}-q4", folder, "q4")

    declined = subprocess.run([str(RUNNER), "rm", "test-org/small"], input="n\n", capture_output=True, text=True,
                              env=pull_env(), timeout=60)
    assert declined.returncode == 1 and "nothing removed" in declined.stderr
    assert repo_folder.exists() and mlx.exists()

    accepted = subprocess.run([str(RUNNER), "rm", "test-org/small"], input="y\n", capture_output=True, text=True,
                              env=pull_env(), timeout=60)
    assert accepted.returncode == 0, accepted.stderr
    assert "Remove these 2" in accepted.stdout
    assert accepted.stdout.strip().endswith("? [y/N] removed 2 folders: 1.01 MB freed")
    assert not repo_folder.exists() and not mlx.exists()
    assert "test-org/small" not in runner("list").stdout
    assert "not a model runner keeps" in one_line_error(runner("rm", "test-org/small", "--yes"))


def test_rm_never_touches_what_runner_does_not_own(hub, tmp_path, own_home):
    mine = tmp_path / "my-models" / "mine"
    small_repo(mine)
    (own_home / "config").mkdir(parents=True)
    (own_home / "config" / "config.toml").write_text(f'model_dirs = ["{mine}"]\n')
    nf4 = derived_cache("nf4-cache", "mine-nf4-0123", mine, "nf4")
    removed = runner("rm", str(mine), "--yes")
    assert removed.returncode == 0, removed.stderr
    assert not nf4.exists() and (mine / "model.safetensors").exists()
    assert "your own folder" in one_line_error(runner("rm", str(mine), "--yes"))

    # a cache folder with a symlink to a file outside runner's caches: refused, both left alone
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(b"keep me")
    linked = derived_cache("mlx", "mine-q4", mine, "q4")
    (linked / "weights.safetensors").symlink_to(outside)
    line = one_line_error(runner("rm", str(linked), "--yes"))
    assert "points outside" in line
    assert linked.exists() and outside.read_bytes() == b"keep me"

    # the same in a repository of the HF cache (a snapshot file linked to a folder of the user's)
    hub.repos["test-org/small"] = Repo(small_repo(tmp_path / "small"))
    assert runner("pull", "test-org/small").returncode == 0
    (snapshot("test-org/small") / "extra.safetensors").symlink_to(outside)
    assert "points outside" in one_line_error(runner("rm", "test-org/small", "--yes"))
    assert snapshot("test-org/small").exists() and outside.exists()


def test_the_built_in_models_f16_copy_is_its_cache(hub, own_home):
    """llama.cpp's F16 copy is made from the built-in model's package GGUF: `runner list` shows it
    under the built-in model, and `runner rm` of the model takes it too."""
    from runner.default_model import gguf_file

    copy = derived_cache("gguf-f16", "SmolLM2-135M-Instruct.Q4_1.0123", gguf_file(), "fp16")
    entry = listed("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert [c["path"] for c in entry["caches"]] == [str(copy)]
    result = runner("rm", "HuggingFaceTB/SmolLM2-135M-Instruct", "-y")
    assert result.returncode == 0, result.stderr
    assert not copy.exists()


def cut_off_pull(hub, repo_id: str) -> None:
    """`runner pull repo_id` stopped with Ctrl-C in the middle of its weights."""
    hub.hold_after["model.safetensors"] = 2_000_000
    process = subprocess.Popen([str(RUNNER), "pull", repo_id], env=pull_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert hub.reached.wait(120), "the pull never reached the weights"
        os.kill(process.pid, signal.SIGINT)
        assert process.communicate(timeout=60)[0] is not None and process.returncode == 130
    finally:
        hub.release.set()
        process.kill()


def test_list_shows_a_pull_cut_off_and_rm_frees_its_bytes(hub, tmp_path, own_home):
    """A download cancelled half-way (Ctrl-C, the chat's Cancel) is listed as partial, with the bytes
    it holds and how to resume, and `runner rm` takes it after asking."""
    from runner.download import human_size
    from runner.store import tree_size

    hub.repos["test-org/small"] = Repo(small_repo(tmp_path / "small", weights=3_000_000))
    cut_off_pull(hub, "test-org/small")
    repo_folder = snapshot("test-org/small").parents[1]
    on_disk = tree_size(repo_folder)
    assert (repo_folder / "blobs").is_dir() and on_disk > 0

    row = next(line for line in runner("list").stdout.splitlines() if line.startswith("test-org/small "))
    assert row.split()[1:] == ["HF", "cache", *human_size(on_disk).split(), "partial:", "runner", "pull",
                               "test-org/small", "resumes", "it"]
    assert listed("test-org/small")["size_bytes"] == on_disk

    declined = subprocess.run([str(RUNNER), "rm", "test-org/small"], input="n\n", capture_output=True, text=True,
                              env=pull_env(), timeout=60)
    assert declined.returncode == 1 and "nothing removed" in declined.stderr and repo_folder.exists()
    accepted = subprocess.run([str(RUNNER), "rm", "test-org/small"], input="y\n", capture_output=True, text=True,
                              env=pull_env(), timeout=60)
    assert accepted.returncode == 0, accepted.stderr
    assert "test-org/small (HF cache, a download not finished)" in accepted.stdout
    assert accepted.stdout.strip().endswith(f"Remove this ({human_size(on_disk)})? [y/N] removed 1 folder: "
                                            f"{human_size(on_disk)} freed")
    assert not repo_folder.exists()
    assert "test-org/small" not in runner("list").stdout


def sharded_small_repo(folder: Path) -> dict[str, Path]:
    """small_repo's config.json with its weights in two shards and their index."""
    files = small_repo(folder)
    files.pop("model.safetensors").unlink()
    names = {"model.layers.0.w": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}
    for tensor, name in names.items():
        files[name] = safetensors_file(folder / name, {tensor: 1_000_000})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    files["model.safetensors.index.json"] = folder / "model.safetensors.index.json"
    return files


def cut_off_hf_download(hub, names: list[str]) -> None:
    """huggingface_hub's own client (as `hf download` or transformers use it) fetching `names` in
    turn, killed in the middle of the last one."""
    hub.hold_after[names[-1]] = 1_000_000
    hub.reached.clear()
    hub.release.clear()
    script = ("import sys\nfrom huggingface_hub import hf_hub_download\n"
              "for name in sys.argv[1:]:\n    hf_hub_download('test-org/small', name)\n")
    process = subprocess.Popen([sys.executable, "-c", script, *names], env=pull_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert hub.reached.wait(120), "the download never reached the weights"
    finally:
        process.kill()
        process.communicate(timeout=60)
        hub.release.set()


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_a_download_of_another_tool_cut_off_after_config_is_listed_and_removable(hub, tmp_path, own_home, sharded):
    """Another tool's download killed while the weights arrive leaves config.json in the snapshot
    (and the shards before) without runner's marker: listed as partial, not ready; runner pull
    finishes it; runner rm removes it."""
    files = sharded_small_repo(tmp_path / "small") if sharded else small_repo(tmp_path / "small", weights=1_000_000)
    held = "model-00002-of-00002.safetensors" if sharded else "model.safetensors"
    hub.repos["test-org/small"] = Repo(files)
    names = [name for name in files if name != held] + [held]    # the others whole, the held file last
    cut_off_hf_download(hub, names)
    folder = snapshot("test-org/small")
    assert (folder / "config.json").is_file() and not (folder / held).exists()
    assert not (folder / ".runner-pull-incomplete").exists()

    entry = listed("test-org/small")
    assert entry["state"] == "partial" and entry["size_bytes"] > 0
    assert "partial: runner pull test-org/small resumes it" in runner("list").stdout
    pulled = runner("pull", "test-org/small")
    assert pulled.returncode == 0, pulled.stderr
    assert listed("test-org/small")["state"] == "ready"

    shutil.rmtree(folder.parents[1])
    cut_off_hf_download(hub, names)
    removed = runner("rm", "test-org/small", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "(HF cache, a download not finished)" in removed.stdout
    assert not folder.parents[1].exists()
