"""Files from the internet or from the user, read with checks: JSON and safetensors headers.

Every reader here turns what is wrong with a file into one error a user can act on (a
`UserInputError`, or `CorruptWeights` for weights): not UTF-8, not JSON, NaN, numbers of thousands
of digits, nesting too deep, too big to be what it claims, a safetensors header whose tensors do not
add up to the file. Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import CorruptWeights, UserInputError
from runner.words import one_line

JSON_MAX_BYTES = 16 * 1024 * 1024   # configs, indexes, tokenizer configs: kilobytes to a few megabytes


def read_text(path: Path, max_bytes: int = JSON_MAX_BYTES) -> str:
    """The UTF-8 text of a file of at most `max_bytes`."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as error:
        raise UserInputError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(data) > max_bytes:
        raise UserInputError(f"{path}: more than {max_bytes / 1024**2:g} MB; not the file runner expects here")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str | bytes, source: object) -> Any:
    """json.loads, with every way it can fail (and NaN/Infinity, which it accepts) one error.
    Bytes must be UTF-8 (json.loads would also take UTF-16 and UTF-32)."""
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, parse_constant=_no_constants)
    except json.JSONDecodeError as error:
        raise UserInputError(f"{source}: malformed JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError as error:
        raise UserInputError(f"{source}: not UTF-8 text (byte {error.start})") from None
    except RecursionError:
        raise UserInputError(f"{source}: malformed JSON (nested too deeply)") from None
    except ValueError as error:   # NaN/Infinity; integers of more than 4300 digits
        raise UserInputError(f"{source}: malformed JSON ({str(error).split(';')[0]})") from None


def read_json(path: Path, max_bytes: int = JSON_MAX_BYTES) -> Any:
    return parse_json(read_text(path, max_bytes), path)


def read_json_object(path: Path, max_bytes: int = JSON_MAX_BYTES) -> dict:
    """A JSON file that must hold an object (config.json, an index, ...)."""
    value = read_json(path, max_bytes)
    if not isinstance(value, dict):
        raise UserInputError(f"{path}: holds {json_kind(value)}, not a JSON object")
    return value


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: "a list", "a string", "null", ..."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


# ---- safetensors ------------------------------------------------------------------------------
# The format: 8 bytes little-endian N, N bytes of JSON {name: {"dtype", "shape", "data_offsets"}},
# optional "__metadata__": {str: str}; then the tensors' bytes, packed end to end in offset order.

SAFETENSORS_HEADER_MAX_BYTES = 100_000_000   # the safetensors library's own limit

# dtype name -> bits per element (the safetensors library's names)
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "C64": 64,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str                 # "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int                 # byte offsets in the data area (after the header)
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    raw: bytes                           # the header's JSON bytes as stored (a fingerprint of the tensors)
    tensors: dict[str, TensorEntry]      # in the file's order of data
    metadata: dict[str, str]
    data_start: int                      # where the data area begins in the file: 8 + header length


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a safetensors file, checked as the safetensors library checks it before it
    reads a tensor: every entry well formed, each tensor's bytes the size its dtype and shape say,
    the tensors packed end to end, and the file exactly as long as they need (a cut file fails
    here in a millisecond, not half-way through a load)."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise CorruptWeights(f"{path}: not a valid safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_MAX_BYTES):
                raise CorruptWeights(f"{path}: not a valid safetensors file (its header claims {length} bytes "
                                     f"of a {size}-byte file)")
            raw = file.read(length)
    except OSError as error:
        raise CorruptWeights(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        header = parse_json(raw, path)
    except UserInputError as error:
        raise CorruptWeights(f"{path}: not a valid safetensors file (corrupt header: "
                             f"{str(error).split(': ', 1)[-1]})") from None
    if not isinstance(header, dict):
        raise CorruptWeights(f"{path}: not a valid safetensors file (its header holds {json_kind(header)}, "
                             "not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptWeights(f"{path}: not a valid safetensors file (__metadata__ must map names to strings)")
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_entry(path, name, entry)
    tensors = dict(sorted(tensors.items(), key=lambda item: (item[1].start, item[1].stop)))
    end = 0
    for name, entry in tensors.items():
        if entry.start != end:
            raise CorruptWeights(f"{path}: not a valid safetensors file (tensor '{one_line(name, 80)}' starts at byte "
                                 f"{entry.start}, not where the one before ends, {end})")
        end = entry.stop
    if 8 + length + end != size:
        raise CorruptWeights(f"{path}: truncated or corrupt ({size} bytes, its header describes {8 + length + end})")
    return SafetensorsHeader(path, raw, tensors, metadata, 8 + length)


def _tensor_entry(path: Path, name: str, entry: Any) -> TensorEntry:
    where = f"{path}: not a valid safetensors file (tensor '{one_line(name, 80)}'"
    if not isinstance(entry, dict):
        raise CorruptWeights(f"{where} is {json_kind(entry)}, not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise CorruptWeights(f"{where}: unknown dtype {dtype!r:.40})")
    if not isinstance(shape, list) or not all(_count(d) for d in shape) or len(shape) > 16:
        raise CorruptWeights(f"{where}: shape must be a list of up to 16 whole numbers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise CorruptWeights(f"{where}: data_offsets must be [start, stop] with 0 <= start <= stop)")
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits != (offsets[1] - offsets[0]) * 8:
        raise CorruptWeights(f"{where}: {dtype} {shape} needs {math.ceil(bits / 8)} bytes, its offsets "
                             f"give {offsets[1] - offsets[0]})")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _count(value: Any) -> bool:
    """A non-negative whole number of at most 64 bits, as sizes and offsets in a header are."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


# ---- a model folder's JSON files ------------------------------------------------------------------

# What transformers and mlx-lm read from a model folder, each assuming a JSON object (a list there
# ends in an AttributeError deep inside them). tokenizer.json reaches tens of megabytes (Gemma: 34 MB).
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                    "special_tokens_map.json", "chat_template.json")
MODEL_JSON_MAX_BYTES = 256 * 1024 * 1024


def check_model_json(folder: Path) -> None:
    """Each of the folder's MODEL_JSON_FILES that is there is UTF-8 JSON holding an object."""
    for name in MODEL_JSON_FILES:
        if (Path(folder) / name).is_file():
            read_json_object(Path(folder) / name, MODEL_JSON_MAX_BYTES)


# What a Hugging Face tokenizer is read from (fast, sentencepiece, byte-level BPE, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def missing_tokenizer(folder: Path, name: str) -> str | None:
    """After a tokenizer failed to load: the reason in words when the folder holds none of the
    TOKENIZER_FILES (a download of the weights alone), else None (the library's reason stands)."""
    folder = Path(folder)
    if not folder.is_dir() or any((folder / file).exists() for file in TOKENIZER_FILES):
        return None
    return (f"{name}: no tokenizer in this folder ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}): "
            "copy the model's tokenizer files next to its config.json")
