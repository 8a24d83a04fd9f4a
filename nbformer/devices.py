"""Devices: names, availability, and the one place that allocates, uploads, downloads and syncs.

Names are "cpu", "cuda" (the first GPU) and "cuda:N"; NBFORMER_DEVICE overrides the default
device of every entry point that is not given one. Everything that holds a buffer a kernel writes
(the executor's arena and input staging, model parameters, KV caches) asks its Device for it, so
a CPU run holds numpy arrays and a CUDA run numba device arrays, and nothing else needs to know.

CUDA needs the numba-cuda package (`pip install "nbformer[cuda]"`), an NVIDIA driver and a GPU;
when any is missing, asking for "cuda" raises one DeviceError saying which. Under Numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1, used by the tests on machines without a GPU) "cuda" runs the
same kernels in Python threads.
"""
from __future__ import annotations

import importlib.util
import os
import re

import numpy as np

from .errors import InputError

DEVICE_KINDS = ("cpu", "cuda")  # the one list of device kinds; ops.py and the CLI read it
ENV_VAR = "NBFORMER_DEVICE"
CUDA_INSTALL_HINT = 'pip install "nbformer[cuda]"'


class DeviceError(InputError):
    """A device was asked for that is unknown, absent, or too small for the job (an InputError: the
    device is an argument like any other)."""


_NAME = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device_name(name) -> tuple:
    """'cpu' | 'cuda' | 'cuda:N' -> (kind, index). Raises DeviceError for anything else."""
    if isinstance(name, Device):
        return name.kind, name.index
    if not isinstance(name, str):
        raise DeviceError(f"device: expected a name like 'cpu', 'cuda' or 'cuda:0', got {type(name).__name__}")
    m = _NAME.match(name.strip().lower())
    if m is None:
        raise DeviceError(f"device: unknown device {name!r} (expected 'cpu', 'cuda' or 'cuda:N')")
    kind, idx = m.group(1), m.group(2)
    if kind == "cpu" and idx not in (None, "0"):
        raise DeviceError(f"device: {name!r}: there is one CPU device, 'cpu'")
    return kind, int(idx or 0)


def default_device_name() -> str:
    return os.environ.get(ENV_VAR, "").strip() or "cpu"


# ---------------------------------------------------------------- CUDA availability
def _cuda_module():
    """numba.cuda, or a DeviceError saying what is missing (numba-cuda, driver, GPU)."""
    from numba import config

    if not config.ENABLE_CUDASIM and importlib.util.find_spec("numba_cuda") is None:
        raise DeviceError(f"device 'cuda': the numba-cuda package is not installed; {CUDA_INSTALL_HINT}")
    try:
        from numba import cuda
    except Exception as e:  # a broken numba-cuda install
        raise DeviceError(f"device 'cuda': numba.cuda cannot be imported ({e}); {CUDA_INSTALL_HINT}") from None
    if config.ENABLE_CUDASIM:
        return cuda
    try:
        ok = cuda.is_available()
    except Exception as e:
        raise DeviceError(f"device 'cuda': the CUDA driver could not be loaded ({e})") from None
    if not ok:
        reason = "no NVIDIA driver or GPU was found"
        try:
            cuda.cudadrv.driver.driver.get_device_count()
            reason = "the CUDA driver loaded but reports no usable GPU"
        except Exception as e:  # the driver library itself is missing
            msg = " ".join(str(e).replace("Error at driver init:", "").split()) or type(e).__name__
            reason = f"no NVIDIA driver could be loaded ({msg.rstrip(':. ')})"
        raise DeviceError(f"device 'cuda': {reason}; nbformer runs on the CPU with device='cpu'")
    return cuda


def cuda_device_count() -> int:
    """Number of usable GPUs (0 when numba-cuda, the driver or a GPU is missing)."""
    try:
        cuda = _cuda_module()
    except DeviceError:
        return 0
    return len(cuda.gpus)


def cuda_unavailable_reason() -> str | None:
    """Why 'cuda' cannot be used here, or None when it can."""
    try:
        _cuda_module()
    except DeviceError as e:
        return str(e)
    return None


def available_devices() -> list:
    """The device names usable on this machine: ['cpu'] plus 'cuda:N' for every GPU."""
    return ["cpu"] + [f"cuda:{i}" for i in range(cuda_device_count())]


# ---------------------------------------------------------------- devices
class Device:
    """Allocation and transfers for one device. Arrays are numpy (cpu) or numba device arrays (cuda)."""

    kind = "cpu"
    index = 0

    @property
    def name(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"

    def __repr__(self):
        return f"Device({self.name!r})"

    # allocation -------------------------------------------------------------
    def empty(self, shape, dtype=np.float32):
        """On a 64-byte boundary (NumPy's large allocations sit 16 bytes past one): the memory
        planner's buffers then start on cache lines, as its offsets intend, and outputs are
        eligible for the AMX GEMM's streaming stores (gemm_amx.streams)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.empty(n + 64, np.uint8)
        off = (-raw.ctypes.data) % 64
        return raw[off:off + n].view(dtype).reshape(shape)

    def zeros(self, shape, dtype=np.float32):
        a = self.empty(shape, dtype)
        a.fill(0)
        return a

    def view(self, buf, offset: int, shape):
        """A shaped window of a flat buffer: buf[offset : offset + prod(shape)].reshape(shape)."""
        n = int(np.prod(shape, dtype=np.int64))
        return buf[offset: offset + n].reshape(shape)

    def upload_flat(self, arrays: dict, what: str) -> tuple:
        """Pack float32 host arrays into one flat device buffer, uploaded in one copy (a model's
        parameters: one buffer per model per device) -> (buffer, {name: shaped view})."""
        from .weights.params import flat_layout

        offsets, n = flat_layout({k: a.shape for k, a in arrays.items()})
        self.ensure_fits(4 * n, what)
        host = np.zeros(max(n, 1), dtype=np.float32)
        for k, a in arrays.items():
            off, size = offsets[k]
            host[off: off + size] = np.asarray(a, dtype=np.float32).reshape(-1)
        buf = self.upload(host)
        return buf, {k: self.view(buf, offsets[k][0], np.shape(a)) for k, a in arrays.items()}

    # transfers -------------------------------------------------------------
    def upload(self, host):
        """A device copy of a host array (the CPU keeps the array itself when it is contiguous)."""
        return np.ascontiguousarray(host)

    def copy_in(self, dst, host):
        """dst (a device array) <- host (same shape and dtype)."""
        dst[...] = host

    def download(self, arr) -> np.ndarray:
        """A host copy of a device array."""
        return np.array(arr, copy=True)

    def to_host(self, arr) -> np.ndarray:
        """The array on the host; no copy where it already lives there."""
        return arr

    def is_device_array(self, a) -> bool:
        return isinstance(a, np.ndarray)

    def synchronize(self):
        pass

    # memory ---------------------------------------------------------------
    def free_bytes(self) -> int | None:
        """Free memory on the device, or None where the operating system manages it (the CPU)."""
        return None

    def total_bytes(self) -> int | None:
        return None

    def ensure_fits(self, nbytes: int, what: str):
        """Raise DeviceError, naming both sizes, when nbytes more would not fit in free device memory."""
        free = self.free_bytes()
        if free is not None and nbytes > free:
            raise DeviceError(f"device {self.name}: {what} needs {_mib(nbytes)} but only {_mib(free)} of "
                              f"{_mib(self.total_bytes())} is free on the device")


def _packed(host) -> np.ndarray:
    """A C-ordered host array with real strides: numba's copies treat a stride of 0 (e.g. ids[:, None])
    as a broadcast axis and refuse the shapes."""
    a = np.ascontiguousarray(host)
    return a.copy() if a.size and 0 in a.strides else a


def _simulated() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _mib(n) -> str:
    if n is None or n == float("inf"):
        return "unlimited"
    return f"{n / 2 ** 20:,.1f} MiB"


class CudaDevice(Device):
    kind = "cuda"

    def __init__(self, index: int):
        cuda = _cuda_module()
        n = len(cuda.gpus)
        if index >= n:
            raise DeviceError(f"device 'cuda:{index}': this machine has {n} GPU{'s' if n != 1 else ''} "
                              f"(cuda:0{'' if n == 1 else f' .. cuda:{n - 1}'})")
        self.cuda, self.index = cuda, index
        cuda.select_device(index)
        self.context = cuda.current_context()

    def empty(self, shape, dtype=np.float32):
        return self.cuda.device_array(shape, dtype=dtype)

    def zeros(self, shape, dtype=np.float32):
        return self.upload(np.zeros(shape, dtype=dtype))

    def upload(self, host):
        return self.cuda.to_device(_packed(host))

    def copy_in(self, dst, host):
        dst.copy_to_device(_packed(host))

    def download(self, arr) -> np.ndarray:
        return arr.copy_to_host()

    def to_host(self, arr) -> np.ndarray:
        return arr if isinstance(arr, np.ndarray) else arr.copy_to_host()

    def is_device_array(self, a) -> bool:
        if _simulated():
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            return isinstance(a, FakeCUDAArray)
        return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)

    def synchronize(self):
        self.cuda.synchronize()

    def _memory(self):
        info = self.context.get_memory_info()
        return info.free, info.total

    def free_bytes(self):
        free = self._memory()[0]
        return None if free == float("inf") else int(free)

    def total_bytes(self):
        total = self._memory()[1]
        return None if total == float("inf") else int(total)

    @property
    def gpu_name(self) -> str:
        dev = self.cuda.get_current_device()
        name = getattr(dev, "name", b"simulator")
        return name.decode() if isinstance(name, bytes) else str(name)


_DEVICES: dict = {}


def get_device(name=None) -> Device:
    """The Device for a name (None: NBFORMER_DEVICE, else 'cpu'); checked, one object per device."""
    if isinstance(name, Device):
        return name
    kind, index = parse_device_name(default_device_name() if name is None else name)
    key = (kind, index)
    dev = _DEVICES.get(key)
    if dev is None:
        dev = Device() if kind == "cpu" else CudaDevice(index)
        _DEVICES[key] = dev
    return dev
