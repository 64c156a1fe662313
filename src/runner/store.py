"""The models on this machine (`runner list`) and their removal (`runner rm`).

What runner can load is what the model picker offers (`runner.tui.models.find_models`: the
built-in model, runner's own folder, the Hugging Face cache, `model_dirs` from the config file),
plus Hugging Face snapshots whose download has not finished (a `runner pull` cut off, or
another tool's download that stopped after config.json). Beside them are the caches the
backends derive from a model, each kind in `models_dir()/<kind>/` as its backend declares
(`<Backend>.caches`: MLX conversions, NF4 reload caches, ...); each records the folder it came
from in a `runner-*.json` file.

`runner rm` removes only folders runner owns: a repository folder of the HF cache, runner's import
of the built-in model, its derived caches. A user's own folder is never touched, nor anything a
symlink inside an owned folder points to outside of it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from runner.errors import UserInputError
from runner.files import read_json_object
from runner.model import PARTIAL_PULL_MARKER, hf_cache_repo, hf_hub_cache, snapshot_ready
from runner.paths import models_dir, user_path

def cache_kinds() -> dict[str, str]:
    """models_dir()/<kind>/<folder>: what the backends derive from a model, kind -> words."""
    from runner.backend import installed_backends

    return {kind: words for cls in installed_backends().values() for kind, words in getattr(cls, "caches", {}).items()}


@dataclass(frozen=True)
class DerivedCache:
    path: Path
    kind: str                  # a backend's cache kind: "mlx", "nf4-cache", ...
    quant: str
    source: Path | None        # the model folder it was made from, as recorded
    size_bytes: int
    what: str = ""             # the kind in words: "MLX conversion", ...

    @property
    def label(self) -> str:
        return f"{self.what or self.kind} ({self.quant})"


@dataclass(frozen=True)
class LocalModel:
    name: str                  # what `load_spec` (and so `runner chat`) takes
    where: str                 # "built-in", "runner", "HF cache", "config"
    path: Path | None          # the folder with config.json; None: not there yet
    state: str                 # "ready", "partial" (a pull to finish), "share" (one host's layers for runner launch),
                               # "not imported" (the built-in, before first use)
    owned: Path | None         # the folder `runner rm` removes; None for the user's own folders
    size_bytes: int
    caches: tuple[DerivedCache, ...] = ()
    layers: tuple[int, int] | None = None    # a share's layers [start, stop), as its pull recorded them


def tree_size(folder: Path) -> int:
    """Bytes of the regular files under `folder`, symlinks not followed (each blob counted once)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += info.st_size
    return total


def _files_size(folder: Path) -> int:
    """Bytes of the files in a user's model folder (its symlinks followed: they are its weights)."""
    total = 0
    for entry in folder.iterdir():
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:
            continue
    return total


def derived_caches() -> list[DerivedCache]:
    caches = []
    for kind, what in cache_kinds().items():
        root = models_dir() / kind
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                continue   # half-written (a conversion under way or killed), or not runner's
            record = next((r for r in map(_read_record, sorted(folder.glob("runner-*.json"))) if r), None)
            if record is None:
                continue
            source = record.get("source")
            caches.append(DerivedCache(folder, kind, str(record.get("quant", "?")),
                                       Path(source) if isinstance(source, str) else None, tree_size(folder), what))
    return caches


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "source" in record else None


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def weights_missing(snapshot: Path) -> bool:
    """A snapshot whose config.json arrived and its safetensors weights did not all (a download by
    another tool cut off: `hf download`, transformers; runner's own pulls leave their marker)."""
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_json_object(index).get("weight_map")
        except UserInputError:
            return False      # not an index runner can read: loading it will say so
        if not isinstance(weight_map, dict):
            return False
        return any(not isinstance(s, str) or not (snapshot / s).is_file() for s in set(weight_map.values()))
    # no weights at all, but pickles: a model runner does not load, not a download cut off
    return not any(snapshot.glob("*.safetensors")) and not any(snapshot.glob("*.bin"))


def _partial_pulls(known: set[str]) -> list[LocalModel]:
    """HF cache repositories whose snapshots are all unfinished: runner pulls cut off (their
    marker) or other tools' downloads that stopped after config.json."""
    cache = hf_hub_cache()
    models = []
    for repo in sorted(cache.glob("models--*")) if cache.is_dir() else ():
        model_id = repo.name[len("models--"):].replace("--", "/", 1)
        snapshots = [s for s in (repo / "snapshots").glob("*") if s.is_dir()]
        if model_id.lower() in known or any(snapshot_ready(s) and not weights_missing(s) for s in snapshots):
            continue
        partial = sorted((s for s in snapshots if (s / PARTIAL_PULL_MARKER).exists() or snapshot_ready(s)),
                         key=lambda s: not (s / PARTIAL_PULL_MARKER).exists())   # runner's own pull first
        if partial:
            layers = share_layers(partial[0] / PARTIAL_PULL_MARKER)
            models.append(LocalModel(model_id, "HF cache", partial[0], "share" if layers else "partial", repo,
                                     tree_size(repo), layers=layers))
    return models


def share_layers(marker: Path) -> tuple[int, int] | None:
    """The layers a `runner pull --layers` share recorded in its marker; None for a pull cut off."""
    try:
        layers = json.loads(marker.read_text()).get("layers")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(layers, list) and len(layers) == 2 and all(type(x) is int for x in layers)
    return (layers[0], layers[1]) if ok and 0 <= layers[0] < layers[1] else None


def share_snapshot(model_id: str) -> tuple[Path, tuple[int, int]] | None:
    """The snapshot of `model_id` in the HF cache that holds one host's share (`runner pull
    --layers`) and the layers [start, stop) it holds: the `main` ref's, else the newest; None where
    there is none (a pull cut off is no share)."""
    repo = hf_cache_repo(model_id)
    try:
        found = [(snapshot, layers) for snapshot in (repo / "snapshots").iterdir()
                 if (layers := share_layers(snapshot / PARTIAL_PULL_MARKER)) is not None
                 and (snapshot / "config.json").is_file()]
        main = (repo / "refs" / "main").read_text().strip() if (repo / "refs" / "main").is_file() else ""
        return max(found, key=lambda pair: (pair[0].name == main, pair[0].stat().st_mtime), default=None)
    except OSError:      # no such repository, or a name the filesystem refuses
        return None


def local_models() -> tuple[list[LocalModel], list[DerivedCache], list[str]]:
    """The models on this machine with their derived caches, the caches whose model is gone, and
    problems with the config file worth showing."""
    from runner.default_model import default_model_folder
    from runner.gguf import default_model_gguf as default_gguf
    from runner.tui.models import find_models

    entries, problems = find_models()
    models = []
    for entry in entries:
        if entry.where == "catalog":
            continue
        if entry.where == "built-in":
            owned = default_model_folder()
            state = "ready" if entry.path is not None else "not imported"
        elif entry.where == "HF cache":   # the picker offers a sharded snapshot with some shards
            owned, state = entry.path.parents[1], "partial" if weights_missing(entry.path) else "ready"
        elif entry.where == "runner":
            owned, state = entry.path, "ready"
        else:
            owned, state = None, "ready"
        size = tree_size(owned) if owned is not None and owned.is_dir() else (_files_size(entry.path) if entry.path else 0)
        models.append(LocalModel(entry.name, entry.where, entry.path, state, owned, size))
    models += _partial_pulls({m.name.lower() for m in models if m.where == "HF cache"})

    caches = derived_caches()
    claimed: set[Path] = set()
    with_caches = []
    for model in models:
        sources = [model.owned or model.path]
        if model.where == "built-in":     # its package's GGUF is a source too (llama.cpp's F16 copy)
            sources.append(default_gguf())
        mine = tuple(c for c in caches if c.source is not None
                     and any(source is not None and _inside(c.source, source)
                             for source in sources))
        claimed |= {c.path for c in mine}
        with_caches.append(replace(model, caches=mine))
    return with_caches, [c for c in caches if c.path not in claimed], problems


# ---- removal --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    path: Path
    what: str
    size_bytes: int
    repo_id: str | None = None   # an HF cache repository: not while a runner pull of it runs


def removals(model: str, caches_only: bool = False) -> list[Removal]:
    """What `runner rm MODEL` removes, every folder checked to be runner's own; raises a one-line
    error for a model not here or a folder runner does not own."""
    models, orphans, _ = local_models()
    path = user_path(model)
    by_path = path.exists() or model.startswith((".", "/", "~"))
    if by_path:
        cache = next((c for c in [*orphans, *(c for m in models for c in m.caches)] if _same(c.path, path)), None)
        if cache is not None:
            return [_checked(cache.path, models_dir() / cache.kind, cache.label, cache.size_bytes)]
        matches = [m for m in models if m.path is not None and (_same(m.path, path) or (m.owned and _same(m.owned, path)))]
        if not matches:   # a folder runner does not list, with caches made from it (`runner chat ./folder`)
            mine = [c for c in orphans if c.source is not None and _same(c.source, path)]
            if mine:
                return [_checked(c.path, models_dir() / c.kind, f"{model}: {c.label}", c.size_bytes) for c in mine]
    else:
        matches = [m for m in models if m.name.lower() == model.lower() and m.where != "config"]
    if not matches:
        raise UserInputError(f"{model}: not a model runner keeps on this machine (runner list shows them)")
    result = []
    for match in matches:
        for cache in match.caches:
            result.append(_checked(cache.path, models_dir() / cache.kind, f"{match.name}: {cache.label}", cache.size_bytes))
        if caches_only:
            continue
        if match.owned is None:
            if not match.caches:
                raise UserInputError(f"{match.path} is your own folder: runner removes only what it made "
                                     "(downloads, imports, caches), and it has no cache of this model")
            continue
        if not match.owned.exists():
            continue
        hub = match.where == "HF cache"
        state = {"partial": ", a download not finished", "share": ", one host's share"}.get(match.state, "")
        what = f"{match.name} ({match.where}{state})"
        removal = _checked(match.owned, hf_hub_cache() if hub else models_dir(), what, match.size_bytes)
        result.append(Removal(removal.path, what, removal.size_bytes, match.name if hub else None))
    if not result:
        raise UserInputError(f"{model}: runner keeps no cache of this model (nothing to remove)")
    return result


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _checked(folder: Path, root: Path, what: str, size: int) -> Removal:
    """`folder` as a Removal, if it is a real folder inside `root` whose symlinks all stay inside it."""
    if folder.is_symlink() or not folder.is_dir():
        raise UserInputError(f"{folder} is a symlink or not a folder: runner removes only folders of its own")
    if not _inside(folder, root) or folder.resolve() == root.resolve():
        raise UserInputError(f"{folder} is not inside {root}: runner removes only what it keeps there")
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = Path(base) / name
            if entry.is_symlink() and not _inside(entry, folder):
                raise UserInputError(f"{entry} points outside {folder} (to {os.readlink(entry)}): runner removes "
                                     "nothing it does not own; remove that folder yourself")
    return Removal(folder, what, size)


def remove(plan: list[Removal]) -> int:
    """Remove the folders (HF cache repositories only when no runner pull of them is running);
    returns the bytes freed."""
    from runner.download import pull_lock

    freed = 0
    for removal in plan:
        if removal.repo_id is not None:
            with pull_lock(removal.path, removal.repo_id):
                shutil.rmtree(removal.path)
        else:
            shutil.rmtree(removal.path)
        freed += removal.size_bytes
    return freed
