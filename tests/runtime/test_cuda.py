"""The ctypes CUDA binding: GPU probe through the driver, device buffers and copies through the runtime. Both need
an NVIDIA GPU and skip loudly without one; the "not installed" answers are tested everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import cuda


def test_missing_libraries_are_reported_by_name() -> None:
    with pytest.raises(cuda.CudaUnavailable, match="libdoes-not-exist.so"):
        cuda._load(["libdoes-not-exist.so"])


def test_device_info_names_the_gpu() -> None:
    try:
        name, cc = cuda.device_info()
    except cuda.CudaUnavailable as exc:
        pytest.skip(f"no NVIDIA driver on this machine ({exc}); runs on a GPU machine or a Jetson")
    assert name and cc[0] >= 5


def test_device_buffers_round_trip() -> None:
    try:
        cuda.device_info()  # a CUDA runtime library without a driver (CPU machines with CUDA wheels) cannot run
        stream = cuda.CudaStream()
    except cuda.CudaUnavailable as exc:
        pytest.skip(f"no NVIDIA driver or CUDA runtime on this machine ({exc}); runs on a GPU machine or a Jetson")
    host = np.arange(4096, dtype=np.float32)
    back = np.zeros_like(host)
    ptr = stream.malloc(host.nbytes)
    try:
        stream.copy(ptr, host.ctypes.data, host.nbytes, cuda.CudaStream.H2D)
        stream.copy(back.ctypes.data, ptr, back.nbytes, cuda.CudaStream.D2H)
        stream.sync()
    finally:
        stream.free(ptr)
    np.testing.assert_array_equal(back, host)
    assert stream.handle != 0
