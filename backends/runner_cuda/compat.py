"""The private parts of torch, transformers and accelerate that runner_cuda relies on, in one place.
Checked against torch 2.11 (CUDA 13, the GPU image) and 2.13 (CPU), transformers 5.17 and 5.24,
accelerate 1.15 and 1.16.

- torch: `torch.cuda._compile_kernel` (NVRTC; it returns a `_CudaKernel` with `.func`, a CUfunction,
  and `._max_shared_mem_bytes`) and `torch.cuda._utils._get_gpu_runtime_library` (the loaded
  libcuda, for `cuLaunchKernelEx`); `nn.Module._buffers` (a model's buffers moved in place).
- transformers: `param._is_hf_initialized` (its loader leaves such parameters alone) and
  `model._skip_keys_device_placement` (what accelerate's dispatch must not move).
- accelerate: `module._hf_hook`, the hook its dispatch attaches (`execution_device`, `offload`)."""

from __future__ import annotations

import ctypes
from typing import Sequence

# cuda.h (CUDA 12.3 and later): CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


def can_compile_kernels() -> bool:
    """Whether this torch compiles CUDA C++ at run time (NVRTC) and a GPU is there."""
    import torch

    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


def compile_kernel(source: str, name: str, options: Sequence[str]):
    """`name` from `source`, compiled by NVRTC for the current GPU."""
    import torch

    return torch.cuda._compile_kernel(source, name, nvcc_options=list(options))


def reserve_shared_memory(kernel, nbytes: int) -> None:
    """Let `kernel` take `nbytes` of dynamic shared memory (over 48 KB needs asking for)."""
    if nbytes >= 48 * 1024 and kernel._max_shared_mem_bytes < nbytes:
        kernel.set_shared_memory_config(nbytes)


def max_shared_memory(device) -> int:
    """The most dynamic shared memory a block may ask for on `device`, as torch's own
    `set_shared_memory_config` reads it (48 KB where the property is missing)."""
    import torch

    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 49152)


def overlapping_launches(device) -> bool:
    """Whether kernels on `device` may start while the kernel before them finishes (programmatic
    dependent launch: a CUDA GPU of compute capability 9.0, Hopper, or later)."""
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


class _LaunchAttributeValue(ctypes.Union):
    _fields_ = [("flag", ctypes.c_int), ("size", ctypes.c_char * 64)]


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchAttributeValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("count", ctypes.c_uint)]


def _argument(value):
    """A kernel argument as the ctypes value it is passed as: a tensor's address, an int, a double."""
    import torch

    if isinstance(value, torch.Tensor):
        if not value.is_cuda:
            raise ValueError("a kernel's tensor arguments must be on the GPU")
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, int):
        return ctypes.c_int(value)
    if isinstance(value, float):
        return ctypes.c_double(value)
    raise TypeError(f"a kernel argument of type {type(value).__name__}")


def launch_overlapping(kernel, grid: Sequence[int], block: Sequence[int], args: Sequence, shared_mem: int = 0) -> None:
    """Launch `kernel` on the current stream allowed to start before the kernel before it has
    finished: its blocks run up to `griddepcontrol.wait` early (loads that do not depend on that
    kernel), the rest after it. Captured into a CUDA graph as a programmatic edge."""
    import torch

    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    values = [_argument(value) for value in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value.flag = 1
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                           torch.cuda.current_stream().cuda_stream, ctypes.pointer(attribute), 1)
    result = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUDA error {result}")


def mark_initialized(parameter) -> None:
    """Tell transformers' loader this parameter already holds its values."""
    parameter._is_hf_initialized = True


def device_placement_skip_keys(model):
    """The module names accelerate's `dispatch_model` must not move (transformers' own list)."""
    return model._skip_keys_device_placement


def move_buffers(model, device) -> None:
    """Every buffer of `model` onto `device`, in place (the registered names and persistence kept)."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def accelerate_hook(module):
    """The hook accelerate's dispatch attached to `module` (where it computes, whether its weights
    are offloaded), or None."""
    return getattr(module, "_hf_hook", None)
