"""Find or make the MLX folder to load for a model and a quant.

- A folder whose config.json has "quantization" is already an MLX quantized model: it loads as is.
- Anything else (a Hugging Face torch checkpoint, or an unquantized MLX folder) is converted once
  with mlx-lm's own conversion steps (`load`, cast, `quantize_model`, `save`, as `mlx_lm.convert`
  does) into `models_dir()/mlx/<name>-<quant>`, written to a temporary folder and renamed into
  place, so a crash never leaves a half-written model that looks finished.
- The converted folder records a fingerprint of its source (`runner-source.json`): when the source
  changes, the old conversion is not reused.
- One host's share of a model (`runner pull --layers`, or `runner launch --pull`: a snapshot whose
  `.runner-pull-incomplete` marker records the layers it holds) converts only what it holds: those
  layers, the embeddings, the final norm and the head, into `<name>-<quant>-layers<A>-<B>`. A
  pipeline rank loads its layers from it (`read_layers`); nothing asks for the shards left on the Hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from runner.backend import LoadProgress
from runner.errors import CorruptWeights, LoadError, UnsupportedModel, UserInputError
from runner.files import check_model_json, missing_tokenizer, read_json_object, read_safetensors_header
from runner.model import PARTIAL_PULL_MARKER
from runner.paths import models_dir

from runner_mlx import GROUP_SIZE, MLX_QUANTS, QUANT_BITS, QUANT_DTYPES
from runner.words import one_line

SOURCE_RECORD = "runner-source.json"
INDEX = "model.safetensors.index.json"
LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")   # model.layers.12.mlp.up_proj.weight -> 12
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


def launch_fingerprint(folder: Path) -> str:
    """What every host of a launch must agree on: config.json, generation_config.json and the
    weight index, which a host holding a share of the model has as whole as one holding all of
    it; without an index (one weight file, never split into shares), `model_fingerprint`."""
    if not (folder / INDEX).is_file():
        return model_fingerprint(folder)
    digest = hashlib.sha256()
    for name in ("config.json", "generation_config.json", INDEX):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


# ---- one host's share of a model --------------------------------------------------------------


def held_layers(folder: Path) -> tuple[int, int] | None:
    """The layers [start, stop) a share holds, as its `runner pull --layers` recorded them in the
    marker; None for a whole model. A pull cut off before it finished is an error."""
    marker = folder / PARTIAL_PULL_MARKER
    if not marker.exists():
        return None
    try:
        text = marker.read_text()
    except OSError:
        text = ""
    return marker_layers(text, f"{folder} holds")


def marker_layers(text: str, holder: str) -> tuple[int, int]:
    """The layers a marker's text records; an error for a marker without them (a pull cut off)."""
    try:
        layers = json.loads(text).get("layers")
    except (ValueError, AttributeError):
        layers = None
    if (isinstance(layers, list) and len(layers) == 2 and all(type(x) is int for x in layers)
            and 0 <= layers[0] < layers[1]):
        return layers[0], layers[1]
    raise UserInputError(f"{holder} a runner pull that did not finish: runner pull resumes it")


def repo_id_of(snapshot: Path) -> str:
    """ORG/NAME of a snapshot in the Hugging Face cache (models--ORG--NAME/snapshots/COMMIT), else the path."""
    repo = snapshot.resolve().parent.parent.name
    return repo[len("models--"):].replace("--", "/", 1) if repo.startswith("models--") else str(snapshot)


def layer_words(layers: tuple[int, int]) -> str:
    return f"{layers[0]}-{layers[1] - 1}"


def covers(held: tuple[int, int] | None, needed: tuple[int, int]) -> bool:
    return held is None or (held[0] <= needed[0] and needed[1] <= held[1])


def share_refusal(holder: str, model: str, held: tuple[int, int], needed: tuple[int, int] | None) -> str:
    """The line for a share that lacks layers a run needs (`needed` None: the whole model)."""
    if needed is None:
        return (f"{holder} holds only layers {layer_words(held)} of {model} (one host's share for runner launch): "
                f"runner pull {model} fetches the rest")
    return (f"{holder} holds layers {layer_words(held)} of {model}; this split needs {layer_words(needed)} "
            "there: runner launch --pull fetches them")


def read_layers(folder: Path, layers: tuple[int, int], model_config: dict | None = None):
    """(model, config) of mlx-lm for `folder` with only the decoder layers [start, stop) (the others
    None, never read), from whatever weight files the folder holds: a share holds only some. Every
    tensor of those layers, of the embeddings, the final norm and the head must be there (mlx-lm's
    strict check, on what is kept), else CorruptWeights: no layer runs on made-up weights."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from runner_mlx.pipeline import drop_other_layers

    start, stop = layers
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = load_model(folder, lazy=True, strict=False, model_config=model_config)
        drop_other_layers(model, start, stop)
        weights = {}
        for file in sorted(folder.glob("model*.safetensors")):      # what mlx-lm's load_model reads
            weights.update(mx.load(str(file)))                      # lazy: only headers are read here
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        kept = [(name, value) for name, value in weights.items()
                if (layer := LAYER_TENSOR.search(name)) is None or start <= int(layer.group(1)) < stop]
        model.load_weights(kept, strict=True)
    except (ValueError, RuntimeError, OSError) as error:
        why = one_line(str(error), 301)          # mlx lists the missing tensors a line each
        raise CorruptWeights(f"{folder}: the weights of layers {start}-{stop - 1} (and the embeddings, norm and "
                             f"head) are not all there ({why})") from None
    return model, config


def quant_of_folder(config: dict) -> str | None:
    """"q4"/"q8" for an MLX folder that is already quantized, None for an unquantized one."""
    quantization = config.get("quantization")
    if not quantization:
        return None
    return f"q{quantization.get('bits')}"


def check_supported(config: dict, folder: Path) -> None:
    """Raise UnsupportedModel when mlx-lm has no implementation of this model_type."""
    from runner_mlx.compat import model_classes

    if model_classes(config) is None:
        raise UnsupportedModel(f"{folder}: mlx-lm {mlx_lm_version()} cannot run model_type '{config.get('model_type')}'")


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


def converted_folder(source: Path, quant: str, layers: tuple[int, int] | None = None) -> Path:
    share = f"-layers{layer_words(layers)}" if layers is not None else ""
    return models_dir() / "mlx" / f"{source.resolve().name}-{quant}{share}"


def mlx_folder(source: Path, quant: str, on_progress: Progress | None = None,
               layers: tuple[int, int] | None = None, holder: str = "this machine") -> Path:
    """The folder to hand to mlx-lm for `source` at `quant`, converting once if needed.

    `layers`: the decoder layers the caller runs (a pipeline rank), None for all of them. A share
    that does not hold them is refused in one line (`holder`: the host, in that line)."""
    if quant not in MLX_QUANTS:
        raise UserInputError(f"the mlx backend runs {', '.join(MLX_QUANTS)}; not '{quant}'")
    config_path = source / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{source}: no config.json in this folder")
    config = read_json(config_path)
    held = held_layers(source)
    if held is not None and (layers is None or not covers(held, layers)):
        raise UserInputError(share_refusal(holder, repo_id_of(source), held, layers))
    already = quant_of_folder(config)
    if already is not None:
        if already != quant:
            raise UserInputError(
                f"{source} is an MLX model already quantized to {already}; load it with --quant {already}"
            )
        check_supported(config, source)
        check_weights(source)
        return source

    target = converted_folder(source, quant, held)
    fingerprint = model_fingerprint(source, with_times=True)
    if (target / SOURCE_RECORD).is_file():
        record = read_json(target / SOURCE_RECORD)
        if record.get("fingerprint") == fingerprint and record.get("conversion") == CONVERSION:
            return target
        notify(on_progress, LoadProgress(
            f"{target.name} is out of date (the source or runner changed); converting again", 0, 0))
    check_supported(config, source)
    convert(source, target, quant, fingerprint, on_progress, held)
    return target


def notify(on_progress: Progress | None, progress: LoadProgress) -> None:
    if on_progress is not None:
        on_progress(progress)


def convert(source: Path, target: Path, quant: str, fingerprint: str, on_progress: Progress | None,
            layers: tuple[int, int] | None = None) -> None:
    """mlx_lm.convert's steps, with progress, into a temporary folder renamed into place.
    `layers`: a share's; only those layers (and the embeddings, norm and head) are read and written."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load, load_tokenizer, quantize_model, save

    what = f"{QUANT_BITS[quant]}-bit, group {GROUP_SIZE}" if quant in QUANT_BITS else QUANT_DTYPES[quant]
    share = f", layers {layer_words(layers)}" if layers is not None else ""
    notify(on_progress, LoadProgress(f"converting {source.name} to MLX ({what}{share}), once", 0, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    quiet = io.StringIO()  # mlx-lm prints "[INFO] ..." on stdout, where runner prints the reply
    try:
        with contextlib.redirect_stdout(quiet):
            fixes = config_fixes(read_json(source / "config.json"))
            if layers is not None:
                model, config = read_layers(source, layers, fixes)
                tokenizer = load_tokenizer(source, eos_token_ids=config.get("eos_token_id"))
            else:
                try:
                    model, tokenizer, config = load(str(source), lazy=True, return_config=True, model_config=fixes)
                except (ValueError, RuntimeError, OSError) as error:
                    if (no_tokenizer := missing_tokenizer(source, str(source))) is not None:
                        raise LoadError(no_tokenizer) from None
                    said = one_line(str(error), 300)   # mlx-lm names every missing parameter: 14 kB for 271
                    raise CorruptWeights(f"{source}: mlx-lm cannot read these weights ({said})") from None
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
            kept = [layer for layer in model.layers if layer is not None]
            for index, layer in enumerate(kept):
                mx.eval(layer.parameters())
                notify(on_progress, LoadProgress("converting layers", index + 1, len(kept), "layers"))
            notify(on_progress, LoadProgress(f"writing {target}", 0, 0))
            save(temporary, source, model, tokenizer, config)
        (temporary / SOURCE_RECORD).write_text(
            json.dumps({"source": str(source.resolve()), "quant": quant, "fingerprint": fingerprint,
                        "conversion": CONVERSION, "mlx_lm": mlx_lm_version(),
                        **({"layers": list(layers)} if layers is not None else {})}, indent=2)
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
