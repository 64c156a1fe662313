"""Where the picker finds models: runner's own models, the Hugging Face cache, folders named in
the config file, and the catalog (plannable before any download).

The config file is `config.toml` in runner's config folder (`$RUNNER_HOME/config/` when set):

    model_dirs = ["~/models", "/data/checkpoints/llama-3.1-8b"]

Each entry is a model folder (with config.json) or a folder of model folders.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from runner.model import DEFAULT_MODEL_ID, catalog_ids, hf_hub_cache, snapshot_ready
from runner.paths import models_dir

WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModelEntry:
    """One model the picker offers."""

    name: str              # what `load_spec` takes: a model id or a folder path
    where: str             # "built-in", "runner", "HF cache", "config", "catalog"
    path: Path | None      # the folder with config.json; None for a catalog entry (no weights here)
    size_bytes: int = 0    # weights on disk; 0 when unknown or not downloaded

    @property
    def downloaded(self) -> bool:
        return self.path is not None


def config_file() -> Path:
    if os.environ.get("RUNNER_HOME"):
        return Path(os.environ["RUNNER_HOME"]).expanduser() / "config" / "config.toml"
    import platformdirs

    return Path(platformdirs.user_config_dir("runner")) / "config.toml"


def configured_dirs() -> tuple[list[Path], str]:
    """Folders listed in the config file, and a problem with the file to show ('' if none)."""
    path = config_file()
    if not path.is_file():
        return [], ""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return [], f"{path}: cannot read it (it is not UTF-8 text)"
    except (OSError, tomllib.TOMLDecodeError) as error:
        return [], f"{path}: cannot read it ({error})"
    dirs = data.get("model_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        return [], f"{path}: model_dirs must be a list of folder paths"
    return [Path(d).expanduser() for d in dirs], ""


def _weights_size(folder: Path) -> int:
    total = 0
    for file in folder.iterdir():
        if file.name.endswith(WEIGHT_SUFFIXES):
            try:
                total += file.stat().st_size  # follows the HF cache's symlinks to the blobs
            except OSError:
                pass
    return total


def _model_folders(folder: Path) -> list[Path]:
    """`folder` itself if it holds a model, else its sub-folders that do."""
    if (folder / "config.json").is_file():
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(sub for sub in folder.iterdir() if sub.is_dir() and (sub / "config.json").is_file())


def _hf_cache_models() -> list[ModelEntry]:
    cache = hf_hub_cache()
    if not cache.is_dir():
        return []
    entries = []
    for repo in sorted(cache.glob("models--*")):
        model_id = repo.name[len("models--") :].replace("--", "/", 1)
        snapshots = [s for s in (repo / "snapshots").glob("*") if snapshot_ready(s)]
        if not snapshots:
            continue
        snapshot = max(snapshots, key=lambda s: s.stat().st_mtime)
        size = _weights_size(snapshot)
        if size:  # a cache entry with only config.json is not a model you can chat with
            entries.append(ModelEntry(model_id, "HF cache", snapshot, size))
    return entries


def find_models() -> tuple[list[ModelEntry], list[str]]:
    """Every model the picker can offer (downloaded ones first), and problems worth showing."""
    from runner.default_model import imported_folder

    problems: list[str] = []
    entries: list[ModelEntry] = []
    default = imported_folder()
    entries.append(
        ModelEntry(DEFAULT_MODEL_ID, "built-in", default, _weights_size(default) if default else 0)
    )
    try:
        for folder in _model_folders(models_dir()):
            if default is None or folder.resolve() != default.resolve():
                size = _weights_size(folder)
                if size:
                    entries.append(ModelEntry(str(folder), "runner", folder, size))
    except OSError as error:
        problems.append(f"{models_dir()}: cannot read it ({error.strerror or error})")
    try:
        entries += _hf_cache_models()
    except OSError as error:
        problems.append(f"{hf_hub_cache()} (the Hugging Face cache): cannot read it ({error.strerror or error})")
    dirs, problem = configured_dirs()
    if problem:
        problems.append(problem)
    for configured in dirs:
        try:
            folders = _model_folders(configured)
            entries += [ModelEntry(str(f), "config", f, _weights_size(f)) for f in folders]
        except OSError as error:     # a folder runner may not read, a disk gone...
            problems.append(f"{configured} (from {config_file()}): cannot read it ({error.strerror or error})")
            continue
        if not folders:
            problems.append(f"{configured} (from {config_file()}): no model folder with config.json there")
    seen = {e.name.lower() for e in entries}
    entries += [ModelEntry(mid, "catalog", None) for mid in catalog_ids() if mid.lower() not in seen]
    return entries, problems
