"""CUDA through ctypes: the GPU's name and compute capability (driver API) and device buffers and copies on a
stream (runtime API), without pycuda or cuda-python. Works on Jetson and x86; Python 3.8+, standard library only.
"""

from __future__ import annotations

import ctypes
from typing import Sequence, Tuple

DRIVER_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
RUNTIME_LIBS = ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0")
_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


class CudaError(RuntimeError):
    """A CUDA call failed."""


class CudaUnavailable(CudaError):
    """The CUDA library is not on this machine."""


def _load(names: Sequence[str]) -> ctypes.CDLL:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaUnavailable(f"none of {', '.join(names)} could be loaded")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise CudaError(f"CUDA {what} failed with error code {rc}")


def device_info(index: int = 0) -> Tuple[str, Tuple[int, int]]:
    """Name and compute capability of GPU ``index`` (driver API). CudaUnavailable without an NVIDIA driver."""
    lib = _load(DRIVER_LIBS)
    _check(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(dev), index), f"cuDeviceGet({index})")
    buf = ctypes.create_string_buffer(256)
    _check(lib.cuDeviceGetName(buf, 256, dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev), "cuDeviceGetAttribute(major)")
    _check(lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev), "cuDeviceGetAttribute(minor)")
    return buf.value.decode(errors="replace").strip(), (major.value, minor.value)


class CudaStream:
    """One CUDA stream with device buffers and asynchronous copies on it (runtime API)."""

    H2D, D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost

    def __init__(self) -> None:
        self.lib = _load(RUNTIME_LIBS)
        self.stream = ctypes.c_void_p()
        _check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        """The stream as an integer (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self.stream.value or 0)

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        _check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(1, nbytes))), "cudaMalloc")
        return int(ptr.value)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        _check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind,
                                        self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        _check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))
