"""Download a model from the Hugging Face Hub into the Hub's own cache: only the files runner
loads, resumable across runs, verified before the model counts as ready.

    pull = prepare("HuggingFaceTB/SmolLM2-360M-Instruct")   # listing, config.json, what is missing
    ... the caller plans with pull.config and calls check_disk(pull) ...
    folder = fetch(pull, on_progress)                       # the snapshot folder, verified
    prepare(repo_id, layers=(0, 63))                        # one host's share of a pipeline split

Checked against huggingface_hub 2.4.0, which supplies the listing with sizes and checksums
(`HfApi.model_info(files_metadata=True)`), tokens and the gated/private answers
(`build_hf_headers`, `hf_raise_for_status`), each file's ETag and location
(`get_hf_file_metadata`), its HTTP client (`get_session`) and the cache layout (`hf_hub_download`
links a finished blob into its snapshot). runner streams the bytes itself: huggingface_hub 2.x
writes each download to a fresh `<etag>.<random>.incomplete` and deletes it on failure, so a cut
download restarts from byte 0. runner keeps `blobs/<etag>.incomplete` and asks for the rest with an
HTTP Range, in the same run (a dropped connection) or the next (Ctrl-C, kill -9, network lost).

Until every file is verified (size, and the sha256 of LFS files or the git blob id of small ones)
the snapshot holds `PARTIAL_PULL_MARKER`, so `load_spec` and the picker do not offer it; a share
(`layers`) keeps it, with its range, until the other layers' shards are there too. A progress
callback may raise `PullCancelled` to stop a pull (the chat's Cancel): what arrived is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from runner.errors import RunnerError, UserInputError
from runner.files import parse_json, read_safetensors_header
from runner.model import PARTIAL_PULL_MARKER
from runner.paths import user_path
from runner.words import one_line

if TYPE_CHECKING:
    from runner.choice import Choice
    from runner.hardware import Machine

# What a transformers folder needs besides its weights. Never a pickle (.bin, .pt, .pth, .pkl, .ckpt):
# only these names, the safetensors shards and their index are ever fetched.
SMALL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
EXTRA_TEMPLATES = re.compile(r"additional_chat_templates/[\w.-]{1,100}\.jinja")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REPORT_EVERY = 1 << 20      # bytes between progress reports
SMALL_MAX_BYTES = 16 * 1024 * 1024        # config.json and the index are read before any weight
LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d{1,6})\.")   # model.layers.12.mlp.up_proj.weight -> 12
REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


class HubAccessDenied(UserInputError):
    """A gated or private repository this user may not read (yet)."""


class HubUnreachable(RunnerError):
    """No network, the Hub down, or the connection lost mid-file (what arrived is kept)."""

    exit_code = 2


class NotEnoughDisk(RunnerError):
    exit_code = 2


class DamagedDownload(RunnerError):
    """A file that does not match the Hub's size or checksum."""


class PullCancelled(RunnerError):
    """The user stopped the pull (the chat's Cancel); what arrived is kept for the next one."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None      # LFS files: the sha256 of the content
    blob_id: str | None     # other files: the git blob id (sha1 of "blob <size>\\0" + content)

    @property
    def expected_etag(self) -> str | None:
        """The blob name the Hub gives this file (its ETag), known before asking for it."""
        return self.sha256 or self.blob_id

    def new_digest(self):
        if self.sha256:
            return hashlib.sha256()
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % self.size)
        return digest

    def matches(self, digest) -> bool:
        expected = self.sha256 or self.blob_id
        return expected is None or digest.hexdigest() == expected


@dataclass(frozen=True)
class Pull:
    """What `runner pull` will fetch, known before the first byte of weights."""

    repo_id: str
    revision: str              # what the user asked for ("main" by default)
    commit: str                # the commit every file comes from
    files: tuple[RemoteFile, ...]
    config: dict
    storage: Path              # <HF cache>/models--org--name
    missing_bytes: int         # still to download (partial downloads subtracted)
    free_bytes: int            # free space where the cache is
    layers: tuple[int, int] | None = None     # only the shards holding layers [start, stop) (one host's share)
    left_out: tuple[RemoteFile, ...] = ()     # the shards a layers pull does not fetch

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.commit

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PullProgress:
    file: str
    stage: str      # "checking" (hashing bytes already here), "downloading", "verified"
    done: int
    total: int


Progress = Callable[[PullProgress], None]


@dataclass(frozen=True)
class PullPlan:
    """The plan for this machine of the model a pull would fetch, as `runner pull` prints it."""

    choice: "Choice"
    refusal: str | None       # why the plan says no (does not fit, or only with offload); None: it fits

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.choice.plan.warnings)


def plan_pull(pull: Pull, machine: "Machine", backend: str | None = None, quant: str | None = None,
              context: int | None = None, kv_bits: int | None = None) -> PullPlan:
    """The core's choice for the repository's config.json on `machine`, and the plan's refusal."""
    from runner.choice import refuse_by_plan, resolve
    from runner.errors import DoesNotFit
    from runner.model import spec_from_config

    spec = spec_from_config(pull.config, pull.repo_id, "hub")
    choice = resolve(spec, machine, backend, quant, context, kv_bits=kv_bits)
    try:
        refuse_by_plan(choice.plan, allow_offload=False)
    except DoesNotFit as error:
        return PullPlan(choice, str(error))
    return PullPlan(choice, None)


def check_repo_id(model: str | None) -> str:
    """A Hugging Face model id, or one clear error."""
    if model is None or not model.strip():
        raise UserInputError("runner pull needs a Hugging Face model id, e.g. runner pull "
                             "HuggingFaceTB/SmolLM2-360M-Instruct (the built-in model needs no download)")
    if user_path(model).exists() or model.startswith((".", "/", "~")):
        raise UserInputError(f"{model}: runner pull downloads from the Hugging Face Hub; a local folder "
                             f"loads as it is: runner chat {model}")
    if not REPO_ID.fullmatch(model) or ".." in model or "--" in model:
        raise UserInputError(f"'{one_line(model, 60)}' is not a Hugging Face model id (write it as org/name)")
    return model


# ---- errors, in one line --------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """huggingface_hub's and the network's exceptions as one line a user can act on."""
    import httpx2   # huggingface_hub 2.x's HTTP client
    from huggingface_hub import errors

    login = "log in with `hf auth login` (or set HF_TOKEN)"
    try:
        yield
    except errors.GatedRepoError:
        raise HubAccessDenied(f"{repo_id} is gated: accept its licence at {_endpoint()}/{repo_id} while logged "
                              f"in there, then {login} and run runner pull again") from None
    except errors.RevisionNotFoundError:
        raise UserInputError(f"{repo_id} has no revision '{revision}' on the Hub") from None
    except errors.RepositoryNotFoundError:
        raise HubAccessDenied(f"{repo_id}: no such model on the Hub, or it is private: check the name, or "
                              f"{login} if you have access") from None
    except errors.LocalEntryNotFoundError:   # hf_hub_download's word for "the Hub did not answer"
        raise HubUnreachable(f"lost the connection to the Hub at {_endpoint()}: run runner pull {repo_id} again "
                             "to resume") from None
    except errors.OfflineModeIsEnabled:
        raise HubUnreachable("HF_HUB_OFFLINE is set: runner pull needs the network (unset HF_HUB_OFFLINE)") from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status in (401, 403):
            raise HubAccessDenied(f"{repo_id}: the Hub refused access (HTTP {status}): {login}, and accept the "
                                  f"model's licence at {_endpoint()}/{repo_id} if it asks for one") from None
        raise RunnerError(f"{repo_id}: the Hub answered HTTP {status}; try again later") from None
    except httpx2.TransportError as error:
        raise HubUnreachable(f"cannot reach the Hub at {_endpoint()} ({one_line(str(error), 160) or type(error).__name__}): "
                             f"no network? run runner pull {repo_id} again once online") from None


# ---- what to fetch --------------------------------------------------------------------------------


def _remote_files(repo_id: str, siblings) -> dict[str, RemoteFile]:
    """The Hub's listing, each entry checked (it comes from the network)."""
    files = {}
    for sibling in siblings or ():
        name, size = sibling.rfilename, sibling.size
        if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise RunnerError(f"{repo_id}: the Hub's listing holds a file name runner will not write ({name!r:.60})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RunnerError(f"{repo_id}: the Hub's listing gives no size for {name}")
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        blob_id = None if sha256 else sibling.blob_id
        for value in (sha256, blob_id):
            if value is not None and not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", str(value)):
                raise RunnerError(f"{repo_id}: the Hub's listing gives a malformed checksum for {name}")
        files[name] = RemoteFile(name, size, sha256, blob_id)
    return files


def _weight_names(repo_id: str, listing: dict[str, RemoteFile], index: dict | None) -> list[str]:
    """The safetensors files transformers loads: the index's shards, else model.safetensors."""
    if index is None:
        if SINGLE in listing:
            return [SINGLE]
        pickles = sorted(n for n in listing if n.endswith(PICKLE_SUFFIXES))
        found = f" (only {', '.join(pickles[:3])}{'…' if len(pickles) > 3 else ''})" if pickles else ""
        raise UserInputError(f"{repo_id} has no safetensors weights{found}: runner never downloads pickled "
                             ".bin/.pt files, which can run code when loaded")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise RunnerError(f"{repo_id}: {INDEX} has no weight_map of tensor names to files")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if "/" in shard or "\\" in shard or not shard.endswith(".safetensors") or shard not in listing:
            raise RunnerError(f"{repo_id}: {INDEX} names {shard!r:.60}, which is not a safetensors file of this repository")
    return shards


def _read_small(repo_id: str, commit: str, remote: RemoteFile) -> bytes:
    """config.json or the index, read into memory before anything is written."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if remote.size > SMALL_MAX_BYTES:
        raise RunnerError(f"{repo_id}: {remote.name} is {remote.size:,} bytes; not the file runner expects")
    url = hf_hub_url(repo_id, remote.name, revision=commit)
    with get_session().stream("GET", url, headers=build_hf_headers(), follow_redirects=True,
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > remote.size:    # never more than the listing says, whatever the server sends
                break
    digest = remote.new_digest()
    digest.update(data)
    if len(data) != remote.size or not remote.matches(digest):
        raise DamagedDownload(f"{repo_id}: {remote.name} does not match the Hub's listing (size or checksum)")
    return bytes(data)


def shards_for_layers(weight_map: dict[str, str], layers: tuple[int, int]) -> list[str]:
    """The shards a pipeline stage running layers [start, stop) reads: those holding a tensor of one
    of its layers, or a tensor of no layer (embeddings, final norm, head: every stage keeps them)."""
    start, stop = layers
    wanted = set()
    for tensor, shard in weight_map.items():
        layer = LAYER_TENSOR.search(tensor)
        if layer is None or start <= int(layer.group(1)) < stop:
            wanted.add(shard)
    return sorted(wanted)


def prepare(repo_id: str, revision: str | None = None, layers: tuple[int, int] | None = None) -> Pull:
    """The listing, config.json and the index from the Hub, and the bytes still missing here. No
    file is written. `layers`: only the shards holding those layers (and the embeddings and head)."""
    from huggingface_hub import HfApi, constants

    with hub_errors(repo_id, revision):
        # huggingface_hub's own default here is no timeout: a Hub (or proxy) that accepts and never
        # answers would hold the pull forever
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        if isinstance(info.id, str) and REPO_ID.fullmatch(info.id) and info.id.lower() == repo_id.lower():
            repo_id = info.id    # the Hub's spelling: the cache folder is named after it
        commit = info.sha
        if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise RunnerError(f"{repo_id}: the Hub gave no commit for revision {revision or 'main'}")
        listing = _remote_files(repo_id, info.siblings)
        if "config.json" not in listing:
            raise UserInputError(f"{repo_id} has no config.json: not a transformers model runner can load")
        config = parse_json(_read_small(repo_id, commit, listing["config.json"]), f"{repo_id}/config.json")
        if not isinstance(config, dict):
            raise UserInputError(f"{repo_id}/config.json does not hold a JSON object")
        index = None
        if INDEX in listing:
            index = parse_json(_read_small(repo_id, commit, listing[INDEX]), f"{repo_id}/{INDEX}")
            if not isinstance(index, dict):
                raise RunnerError(f"{repo_id}: {INDEX} does not hold a JSON object")
    names = [n for n in listing if n in SMALL_FILES or EXTRA_TEMPLATES.fullmatch(n)]
    shards = _weight_names(repo_id, listing, index)
    kept = shards if layers is None or index is None else shards_for_layers(index["weight_map"], layers)
    names += ([INDEX] if index is not None else []) + kept
    files = tuple(listing[name] for name in names)
    left_out = tuple(listing[name] for name in shards if name not in kept)
    storage = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))   # the cache's layout
    snapshot = storage / "snapshots" / commit
    missing = sum(_missing_bytes(storage, snapshot, f) for f in files)
    return Pull(repo_id, revision or "main", commit, files, config, storage, missing, free_space(storage),
                layers, left_out)


def _missing_bytes(storage: Path, snapshot: Path, remote: RemoteFile) -> int:
    if (snapshot / remote.name).exists():
        return 0
    etag = remote.expected_etag
    if etag is None:
        return remote.size
    if (storage / "blobs" / etag).exists():
        return 0
    partial = storage / "blobs" / f"{etag}.incomplete"
    kept = partial.stat().st_size if partial.is_file() else 0
    return max(remote.size - kept, 0)


def free_space(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    for candidate in [path, *path.parents]:
        try:
            return shutil.disk_usage(candidate).free
        except OSError:   # not there yet: its parent's filesystem
            continue
    return 0


def human_size(n: int) -> str:
    """Bytes in decimal units, about three digits: 724 MB, 1.23 GB, 1.6 TB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} bytes"


def check_disk(pull: Pull) -> None:
    """Refuse, before the first byte, a download the free disk cannot hold."""
    if pull.missing_bytes > pull.free_bytes:
        raise NotEnoughDisk(
            f"{pull.repo_id} needs {human_size(pull.missing_bytes)} more on the disk of {pull.storage.parent}, which "
            f"has {human_size(pull.free_bytes)} free: free some space (runner list, runner rm) or point HF_HOME at a "
            f"larger disk"
        )


# ---- fetching -----------------------------------------------------------------------------------


def fetch(pull: Pull, on_progress: Progress | None = None) -> Path:
    """Download what is missing, verify every file, and return the snapshot folder, ready."""
    report = on_progress or (lambda event: None)
    try:
        with pull_lock(pull.storage, pull.repo_id), hub_errors(pull.repo_id, pull.revision):
            _fetch_files(pull, report)
    except OSError as error:   # a full disk, a folder that may not be written (HTTP errors are handled inside)
        raise RunnerError(f"{pull.storage}: cannot write ({error.strerror or error}); what arrived is kept: "
                          f"runner pull {pull.repo_id} resumes") from None
    return pull.snapshot


def _fetch_files(pull: Pull, report: Progress) -> None:
    """Each file verified (or downloaded, then verified); the marker goes last."""
    marker = pull.snapshot / PARTIAL_PULL_MARKER
    verified = _read_marker(marker)
    for remote in pull.files:
        if verified.get(remote.name) == remote.size and _size_here(pull.snapshot / remote.name) == remote.size:
            report(PullProgress(remote.name, "verified", remote.size, remote.size))
            continue
        if not _present_and_intact(pull, remote, report):
            _write_marker(marker, verified)      # before anything changes: the snapshot is not ready
            _discard(pull, remote)
            _download(pull, remote, report)
        verified[remote.name] = remote.size
        if marker.exists():
            _write_marker(marker, verified)
        report(PullProgress(remote.name, "verified", remote.size, remote.size))
    if pull.revision != pull.commit:
        ref = pull.storage / "refs" / pull.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(pull.commit)
    if any(verified.get(f.name) != f.size and _size_here(pull.snapshot / f.name) != f.size for f in pull.left_out):
        _write_marker(marker, verified, pull.layers)   # one host's share: never offered as a whole model
    else:
        marker.unlink(missing_ok=True)


def _size_here(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_marker(marker: Path) -> dict[str, int]:
    """Files an earlier, cut-off pull of this snapshot already verified: {name: size}."""
    try:
        verified = json.loads(marker.read_text()).get("verified", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in verified.items() if isinstance(k, str) and isinstance(v, int)} \
        if isinstance(verified, dict) else {}


def _write_marker(marker: Path, verified: dict[str, int], layers: tuple[int, int] | None = None) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    temporary = marker.with_name(marker.name + f".{os.getpid()}")
    record = {"verified": verified, **({"layers": list(layers)} if layers else {})}
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, marker)


@contextlib.contextmanager
def pull_lock(storage: Path, repo_id: str) -> Iterator[None]:
    """One pull of a repository at a time (two would append to the same partial file), and no
    `runner rm` of it meanwhile. `storage` is its folder in the HF cache."""
    import fcntl

    folder = storage.parent / ".locks" / storage.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "runner-pull.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"a runner pull of {repo_id} is running; wait for it to end") from None
        yield


def _hash_file(path: Path, remote: RemoteFile, report: Progress, digest=None, limit: int | None = None):
    """The digest of `path` (its first `limit` bytes), reported as the 'checking' stage."""
    digest = digest or remote.new_digest()
    total = path.stat().st_size if limit is None else limit
    done = 0
    with path.open("rb") as file:
        while done < total and (chunk := file.read(min(8 << 20, total - done))):
            digest.update(chunk)
            done += len(chunk)
            report(PullProgress(remote.name, "checking", done, total))
    return digest


def _present_and_intact(pull: Pull, remote: RemoteFile, report: Progress) -> bool:
    """Is the file already in the snapshot (an earlier run, another tool), matching the listing?"""
    pointer = pull.snapshot / remote.name
    return _size_here(pointer) == remote.size and remote.matches(_hash_file(pointer, remote, report))


def _discard(pull: Pull, remote: RemoteFile) -> None:
    """A snapshot entry that does not match the listing, and its blob: it is downloaded again."""
    pointer = pull.snapshot / remote.name
    if not os.path.lexists(pointer):
        return
    blob = pointer.resolve()
    pointer.unlink()
    if blob.parent == (pull.storage / "blobs").resolve():
        blob.unlink(missing_ok=True)


def _download(pull: Pull, remote: RemoteFile, report: Progress) -> None:
    """One file into blobs/<etag>, resumed from blobs/<etag>.incomplete, verified, then linked into
    the snapshot by huggingface_hub."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    metadata = get_hf_file_metadata(hf_hub_url(pull.repo_id, remote.name, revision=pull.commit))
    if not metadata.etag or "/" in metadata.etag or metadata.etag.startswith("."):
        raise RunnerError(f"{pull.repo_id}: the Hub gave no usable ETag for {remote.name}")
    blobs = pull.storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob, partial = blobs / metadata.etag, blobs / f"{metadata.etag}.incomplete"
    if blob.exists() and not (_size_here(blob) == remote.size and remote.matches(_hash_file(blob, remote, report))):
        blob.unlink()
    if not blob.exists():
        resumed = _size_here(partial) or 0
        digest = _stream(pull, remote, metadata.location, partial, report)
        if _size_here(partial) != remote.size or not remote.matches(digest):
            partial.unlink(missing_ok=True)
            if not resumed:
                raise DamagedDownload(
                    f"{remote.name} of {pull.repo_id} arrived damaged ({_checksum_words(remote, digest)}); it was "
                    f"deleted: run runner pull {pull.repo_id} again"
                )
            # the bytes kept from an earlier run were bad (a crash mid-write?): once more, from byte 0
            digest = _stream(pull, remote, metadata.location, partial, report)
            if _size_here(partial) != remote.size or not remote.matches(digest):
                partial.unlink(missing_ok=True)
                raise DamagedDownload(f"{remote.name} of {pull.repo_id} arrived damaged twice "
                                      f"({_checksum_words(remote, digest)}); it was deleted")
        if remote.name.endswith(".safetensors"):
            read_safetensors_header(partial)    # what the Hub holds is not always a readable file
        os.replace(partial, blob)
    hf_hub_download(pull.repo_id, remote.name, revision=pull.commit)


def _checksum_words(remote: RemoteFile, digest) -> str:
    kind = "sha256" if remote.sha256 else "git blob id"
    return f"{kind} {digest.hexdigest()[:12]}…, the Hub says {(remote.sha256 or remote.blob_id or '')[:12]}…"


def _origin(url) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _stream(pull: Pull, remote: RemoteFile, location: str, partial: Path, report: Progress):
    """Append the rest of `remote` to `partial` (HTTP Range from the bytes already there) and return
    the digest of the whole. A connection dropped after some bytes arrived is resumed at once; one
    that brings nothing ends the pull (the bytes stay for the next run)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"   # a Range counts bytes of the file, not of a gzip stream
    if _origin(httpx2.URL(location)) != _origin(httpx2.URL(_endpoint())):
        headers.pop("authorization", None)   # a signed CDN address: the token stays with the Hub
    if (_size_here(partial) or 0) > remote.size:
        partial.unlink()
    digest = _hash_file(partial, remote, report) if partial.exists() else remote.new_digest()
    with partial.open("ab") as out:
        done = out.tell()
        report(PullProgress(remote.name, "downloading", done, remote.size))
        while done < remote.size:
            received = 0
            ranged = dict(headers, Range=f"bytes={done}-") if done else headers
            try:
                with get_session().stream("GET", location, headers=ranged, follow_redirects=True,
                                          timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                    if response.status_code >= 400:
                        response.read()
                        hf_raise_for_status(response)
                    if done and response.status_code != 206:   # the server sent the whole file again
                        out.truncate(0)
                        done, digest = 0, remote.new_digest()
                    reported = done
                    for chunk in response.iter_bytes():   # as the network delivers: each byte kept at once
                        if done + len(chunk) > remote.size:
                            out.flush()
                            partial.unlink()
                            raise DamagedDownload(f"{remote.name} of {pull.repo_id}: the server sent more than "
                                                  f"the {remote.size:,} bytes the Hub lists; it was deleted")
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        received += len(chunk)
                        if done - reported >= REPORT_EVERY or done == remote.size:
                            reported = done
                            report(PullProgress(remote.name, "downloading", done, remote.size))
            except httpx2.TransportError as error:
                if not received:
                    out.flush()
                    raise HubUnreachable(
                        f"lost the connection to the Hub while downloading {remote.name} ({human_size(done)} of "
                        f"{human_size(remote.size)} kept; {one_line(str(error), 160) or type(error).__name__}): run runner pull "
                        f"{pull.repo_id} again to resume"
                    ) from None
            if done < remote.size and not received:
                raise HubUnreachable(f"the Hub sent nothing more of {remote.name} ({human_size(done)} of "
                                     f"{human_size(remote.size)} kept): run runner pull {pull.repo_id} again to resume")
    return digest
