"""Scheme `fp16` of the llamacpp backend: a copy of a GGUF file with every quantized tensor
dequantized to F16, written once into runner's cache and run by llama.cpp like any GGUF: the
folder `models_dir()/gguf-f16/<name>.<key>/` holds `<name>.F16.gguf` and `runner-source.json`
(the file it was made from, as the other backends' caches record theirs for `runner list`/`rm`).

Why: llama.cpp multiplies a quantized weight (Q4_1, Q8_0, Q4_K ...) by activations it first
rounds to 8 bits per value (Q8_1 / Q8_0 / Q8_K blocks of 32 or 256). On the default model
(SmolLM2-135M, Q4_1 with a Q8_0 embedding) that rounding alone moves the logits by a mean KL of
4.9e-3 from the same weights in float32, enough to flip the near-tie of the README's first question
("The" 0.08 nats ahead of "L" in float32: "L'Étoile, la Marseillaise, …"). F16 weights are
multiplied by F16 activations: mean KL 1.1e-5 and the same answer, at the same decode speed on a
CPU (bench/RESULTS.md). Float tensors (F32, F16, BF16: the norms) are copied as they are.

  f16_copy(source, on_progress)  the copy's path, written on first use (gguf-py: read, dequantize, write)
  f16_breakdown(model)           the plan's weight bytes for `fp16`, from the source's header (pure Python)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from runner.backend import LoadProgress
from runner.errors import CorruptWeights, UserInputError
from runner.paths import models_dir

if TYPE_CHECKING:
    from runner.gguf import GgufTensor
    from runner.model import ModelSpec
    from runner.plan_rules import WeightsBreakdown

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")   # copied as stored: nothing to dequantize
MOSTLY_F16 = 1                                # llama.cpp's general.file_type for an F16 file
CONVERSION = 1                                # raise when the copy changes, so older copies are made again
CACHE_KIND = "gguf-f16"                       # models_dir()/<kind>/: the copies
SOURCE_RECORD = "runner-source.json"
STAGE = "writing an F16 copy of the GGUF (once)"


def f16_nbytes(tensor: "GgufTensor") -> int:
    """Bytes of `tensor` in the copy: 2 per value unless it is a float type already."""
    return tensor.nbytes if tensor.type_name in FLOAT_TYPES else tensor.elements * 2


def f16_breakdown(model: "ModelSpec") -> "WeightsBreakdown":
    """The plan's weight bytes of the F16 copy of `model`'s GGUF, grouped as `gguf_breakdown` does."""
    from runner.gguf import gguf_breakdown

    return gguf_breakdown(model, f16_nbytes)


def copy_path(source: Path) -> Path:
    """Where the copy of `source` lives: in a folder named by the source's name, and by its path,
    size and modification time (a file changed in place gets a new copy)."""
    stat = source.stat()
    key = f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERSION}".encode()
    folder = models_dir() / CACHE_KIND / f"{source.stem}.{hashlib.sha256(key).hexdigest()[:16]}"
    return folder / f"{source.stem}.F16.gguf"


def remove_abandoned(root: Path) -> None:
    """Half-written copies (staging folders) whose process is gone (killed, crashed)."""
    for staging in root.glob(".*.writing-*"):
        try:
            os.kill(int(staging.name.rsplit("-", 1)[-1]), 0)   # signal 0: only asks whether it exists
        except (ValueError, ProcessLookupError):
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:   # it exists, owned by someone else
            pass


def f16_copy(source: Path, on_progress: Callable[[LoadProgress], None] | None = None) -> Path:
    """The F16 copy of `source` (checked by `runner.gguf.read_gguf` before), written on first use
    to a temporary name and renamed into place, so a crash never leaves a half-written copy."""
    target = copy_path(source)
    if target.is_file():
        return target
    root = target.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root)
    check_free_space(source, root)
    require_gguf_py()
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(source)
    staging = root / f".{target.parent.name}.writing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writer = GGUFWriter(staging / target.name, arch=reader.fields["general.architecture"].contents(),
                        endianess=reader.endianess)
    try:
        write_f16(reader, writer, source, on_progress)
        writer.close()
        write_source_record(staging, source)
        move_into_place(staging, target)
    except BaseException:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_free_space(source: Path, root: Path) -> None:
    """Refuse before writing anything when `root`'s disk cannot hold the copy (with 5% to spare)."""
    from runner.gguf import read_gguf

    needed = sum(f16_nbytes(t) for t in read_gguf(source).tensors)
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        raise UserInputError(f"--quant fp16 writes an F16 copy of {source.name} ({needed / 1e9:.2f} GB) into "
                             f"{root}, which has {free / 1e9:.2f} GB free; free some space, or use "
                             "--quant gguf (the file as stored)")


def require_gguf_py() -> None:
    """One line saying how to install gguf-py when it (or a part the copy uses) cannot be imported."""
    try:
        import numpy  # noqa: F401
        from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter  # noqa: F401
        from gguf.quants import dequantize  # noqa: F401
    except ImportError:
        raise UserInputError("--quant fp16 on llama.cpp writes an F16 copy of the GGUF with gguf-py, which is not "
                             "installed: pip install gguf (or --quant gguf: the file as stored)") from None


def write_f16(reader, writer, source: Path, on_progress: Callable[[LoadProgress], None] | None) -> None:
    """`reader`'s file through `writer`: its metadata, then every tensor, quantized ones as F16."""
    copy_metadata(reader, writer)
    add_tensor_infos(reader, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    write_tensors(reader, writer, source, on_progress)


def copy_metadata(reader, writer) -> None:
    """Every key of the source but those the writer sets itself; the file type says F16."""
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)
    writer.add_file_type(MOSTLY_F16)
    if "general.alignment" in reader.fields:
        writer.add_custom_alignment(int(reader.fields["general.alignment"].contents()))


def add_tensor_infos(reader, writer) -> None:
    """Each tensor's name, shape and type in the copy: float types as stored, the others F16."""
    import numpy as np
    from gguf import GGMLQuantizationType

    for tensor in reader.tensors:
        if tensor.tensor_type.name in FLOAT_TYPES:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   raw_dtype=tensor.tensor_type)
        else:
            shape = tuple(int(d) for d in reversed(tensor.shape))
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float16), 2 * int(np.prod(shape)),
                                   raw_dtype=GGMLQuantizationType.F16)


def write_tensors(reader, writer, source: Path, on_progress: Callable[[LoadProgress], None] | None) -> None:
    """Each tensor's data in the order of the infos, reporting progress per tensor."""
    for index, tensor in enumerate(reader.tensors):
        if tensor.tensor_type.name in FLOAT_TYPES:
            writer.write_tensor_data(tensor.data)
        else:
            writer.write_tensor_data(dequantized_f16(tensor, source))
        if on_progress is not None:
            on_progress(LoadProgress(STAGE, index + 1, len(reader.tensors), "tensors"))


def dequantized_f16(tensor, source: Path):
    """A quantized tensor's values as F16, refused where gguf-py cannot dequantize its type or
    where a value does not fit F16."""
    import numpy as np
    from gguf.quants import dequantize

    try:
        with np.errstate(over="ignore", invalid="ignore"):   # checked just below
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float16)
    except NotImplementedError:
        raise UserInputError(f"{source}: gguf-py cannot dequantize {tensor.tensor_type.name} (tensor "
                             f"{tensor.name}), so runner cannot write its F16 copy: use --quant gguf") from None
    if not np.isfinite(values).all():
        raise CorruptWeights(f"{source}: tensor {tensor.name} holds values beyond F16's range "
                             "(or NaN): use --quant gguf")
    return values


def write_source_record(staging: Path, source: Path) -> None:
    """The file the copy was made from, for `runner list`/`rm` (as the other backends' caches record theirs)."""
    record = {"source": str(source.resolve()), "quant": "fp16", "conversion": CONVERSION}
    (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def move_into_place(staging: Path, target: Path) -> None:
    """The finished staging folder renamed to the copy's folder, unless another process got there first."""
    if target.is_file():            # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(target.parent, ignore_errors=True)    # a broken earlier copy
    os.replace(staging, target.parent)


__all__ = ["f16_copy", "f16_breakdown", "f16_nbytes", "copy_path"]
