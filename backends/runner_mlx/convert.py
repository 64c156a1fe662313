"""Find or make the MLX folder to load for a model and a quant.

- A folder whose config.json has "quantization" is already an MLX quantized model: it loads as is.
- Anything else (a Hugging Face torch checkpoint, or an unquantized MLX folder) is converted once
  with mlx-lm's own conversion steps (`load`, cast, `quantize_model`, `save`, as `mlx_lm.convert`
  does) into `models_dir()/mlx/<name>-<quant>`, written to a temporary folder and renamed into
  place, so a crash never leaves a half-written model that looks finished.
- The converted folder records a fingerprint of its source (`runner-source.json`): when the source
  changes, the old conversion is not reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from runner.backend import LoadProgress
from runner.errors import CorruptWeights, UnsupportedModel, UserInputError
from runner.files import check_model_json, read_json_object, read_safetensors_header
from runner.paths import models_dir

from runner_mlx import GROUP_SIZE, MLX_QUANTS, QUANT_BITS, QUANT_DTYPES

SOURCE_RECORD = "runner-source.json"
CONVERSION = 2   # raise when runner's conversion changes, so older conversions are made again

Progress = Callable[[LoadProgress], None]


def read_json(path: Path) -> dict:
    return read_json_object(path)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets), checked."""
    return read_safetensors_header(path).raw


def check_weights(folder: Path) -> list[Path]:
    """The safetensors files of `folder`, each with a readable header and its full length."""
    files = weight_files(folder)
    if not files:
        raise UserInputError(f"{folder}: no *.safetensors weights in this folder (runner reads safetensors only)")
    check_model_json(folder)
    for file in files:
        safetensors_header(file)
    return files


def model_fingerprint(folder: Path, *, with_times: bool = False) -> str:
    """A hash of config.json and of every weight file's name, size and tensor index.

    Two hosts holding copies of the same model get the same fingerprint (file times are left out
    unless `with_times`, which the conversion cache uses to notice a source changed in place)."""
    digest = hashlib.sha256()
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for file in check_weights(folder):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0".encode())
        if with_times:
            digest.update(str(stat.st_mtime_ns).encode())
        digest.update(safetensors_header(file))
    return digest.hexdigest()


def quant_of_folder(config: dict) -> str | None:
    """"q4"/"q8" for an MLX folder that is already quantized, None for an unquantized one."""
    quantization = config.get("quantization")
    if not quantization:
        return None
    return f"q{quantization.get('bits')}"


def check_supported(config: dict, folder: Path) -> None:
    """Raise UnsupportedModel when mlx-lm has no implementation of this model_type."""
    from mlx_lm.utils import _get_classes  # mlx-lm's own lookup, remappings included

    try:
        _get_classes(config)
    except (ValueError, KeyError):
        raise UnsupportedModel(
            f"{folder}: mlx-lm {mlx_lm_version()} cannot run model_type '{config.get('model_type')}'"
        ) from None


def config_fixes(config: dict) -> dict:
    """Settings mlx-lm would miss in this config.json, to pass to its loader as `model_config`.

    transformers 5 writes RoPE as "rope_parameters" ({"rope_theta": ..., "rope_type": ...}); mlx-lm
    0.32's Llama reads only a top-level "rope_theta" and "rope_scaling", and would silently fall
    back to theta 10000 (SmolLM2 uses 100000: every logit changes)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return {}
    fixes = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        fixes["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return fixes


def mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def converted_folder(source: Path, quant: str) -> Path:
    return models_dir() / "mlx" / f"{source.resolve().name}-{quant}"


def mlx_folder(source: Path, quant: str, on_progress: Progress | None = None) -> Path:
    """The folder to hand to mlx-lm for `source` at `quant`, converting once if needed."""
    if quant not in MLX_QUANTS:
        raise UserInputError(f"the mlx backend runs {', '.join(MLX_QUANTS)}; not '{quant}'")
    config_path = source / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{source}: no config.json in this folder")
    config = read_json(config_path)
    already = quant_of_folder(config)
    if already is not None:
        if already != quant:
            raise UserInputError(
                f"{source} is an MLX model already quantized to {already}; load it with --quant {already}"
            )
        check_supported(config, source)
        check_weights(source)
        return source

    target = converted_folder(source, quant)
    fingerprint = model_fingerprint(source, with_times=True)
    if (target / SOURCE_RECORD).is_file():
        record = read_json(target / SOURCE_RECORD)
        if record.get("fingerprint") == fingerprint and record.get("conversion") == CONVERSION:
            return target
        notify(on_progress, LoadProgress(
            f"{target.name} is out of date (the source or runner changed); converting again", 0, 0))
    check_supported(config, source)
    convert(source, target, quant, fingerprint, on_progress)
    return target


def notify(on_progress: Progress | None, progress: LoadProgress) -> None:
    if on_progress is not None:
        on_progress(progress)


def convert(source: Path, target: Path, quant: str, fingerprint: str, on_progress: Progress | None) -> None:
    """mlx_lm.convert's steps, with progress, into a temporary folder renamed into place."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load, quantize_model, save

    what = f"{QUANT_BITS[quant]}-bit, group {GROUP_SIZE}" if quant in QUANT_BITS else QUANT_DTYPES[quant]
    notify(on_progress, LoadProgress(f"converting {source.name} to MLX ({what}), once", 0, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    quiet = io.StringIO()  # mlx-lm prints "[INFO] ..." on stdout, where runner prints the reply
    try:
        with contextlib.redirect_stdout(quiet):
            try:
                model, tokenizer, config = load(str(source), lazy=True, return_config=True,
                                                model_config=config_fixes(read_json(source / "config.json")))
            except (ValueError, RuntimeError, OSError) as error:
                raise CorruptWeights(f"{source}: mlx-lm cannot read these weights ({error})") from None
            dtype_name = QUANT_DTYPES.get(quant) or config.get("torch_dtype")
            if dtype_name in ("float16", "bfloat16", "float32"):
                dtype = getattr(mx, dtype_name)
                cast_predicate = getattr(model, "cast_predicate", lambda _: True)

                def cast(path, value):
                    if cast_predicate(path) and mx.issubdtype(value.dtype, mx.floating):
                        return value.astype(dtype)
                    return value

                model.update(tree_map_with_path(cast, model.parameters()))
            if quant in QUANT_BITS:
                model, config = quantize_model(model, config, GROUP_SIZE, QUANT_BITS[quant])
            layers = model.layers
            for index, layer in enumerate(layers):
                mx.eval(layer.parameters())
                notify(on_progress, LoadProgress("converting layers", index + 1, len(layers), "layers"))
            notify(on_progress, LoadProgress(f"writing {target}", 0, 0))
            save(temporary, source, model, tokenizer, config)
        (temporary / SOURCE_RECORD).write_text(
            json.dumps({"source": str(source.resolve()), "quant": quant, "fingerprint": fingerprint,
                        "conversion": CONVERSION, "mlx_lm": mlx_lm_version()}, indent=2)
        )
        replace_folder(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an older `target` is moved aside first and then deleted."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        # another process finished the same conversion first: theirs is as good as ours
        if not (target / SOURCE_RECORD).is_file():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
