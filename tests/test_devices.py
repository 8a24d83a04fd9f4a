"""The device layer: names, the NBFORMER_DEVICE override, availability with its reasons, allocation
checks before anything is allocated, and clear errors where CUDA cannot run (no GPU, no numba-cuda,
a GPU index this machine does not have, a model larger than free device memory).

The tests process runs CUDA under Numba's simulator (tests/conftest.py); the "no GPU" cases run in
a subprocess without the simulator, as a user on a machine without a GPU would."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbformer
from nbformer import devices, ops
from nbformer.devices import DeviceError, get_device, parse_device_name
from nbformer.errors import GraphError

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.mark.parametrize("name, want", [("cpu", ("cpu", 0)), ("cuda", ("cuda", 0)), ("cuda:0", ("cuda", 0)),
                                        ("cuda:3", ("cuda", 3)), ("CUDA:1", ("cuda", 1)), (" cpu ", ("cpu", 0))])
def test_device_names(name, want):
    assert parse_device_name(name) == want


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "cpu:1", "", "tpu:0", 3])
def test_bad_device_names_are_clear_errors(name):
    with pytest.raises(DeviceError, match="device"):
        parse_device_name(name)


def test_environment_override(monkeypatch):
    monkeypatch.setenv("NBFORMER_DEVICE", "cuda:0")
    assert devices.default_device_name() == "cuda:0"
    monkeypatch.delenv("NBFORMER_DEVICE")
    assert devices.default_device_name() == "cpu"
    assert get_device(None).name == "cpu"


def test_cpu_is_always_available():
    assert devices.available_devices()[0] == "cpu"
    assert get_device("cpu") is get_device("cpu")


@pytest.mark.skipif(not SIMULATED, reason="simulator-specific: one simulated GPU")
def test_simulated_gpu_is_listed_and_a_missing_index_is_refused():
    assert devices.available_devices() == ["cpu", "cuda:0"]
    assert devices.cuda_unavailable_reason() is None
    with pytest.raises(DeviceError, match=r"cuda:7.*this machine has 1 GPU"):
        get_device("cuda:7")


def _run_without_simulator(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _has_real_gpu() -> bool:
    r = _run_without_simulator("import nbformer.devices as d; print(d.cuda_device_count())")
    return r.stdout.strip().endswith(("1", "2", "3", "4", "5", "6", "7", "8"))


def test_cuda_without_a_gpu_is_one_clear_error():
    """On a machine without a GPU (this one, unsimulated): DeviceError naming what is missing."""
    code = ("import nbformer\n"
            "from nbformer.devices import DeviceError, available_devices\n"
            "print(available_devices())\n"
            "try:\n    nbformer.devices.get_device('cuda')\nexcept DeviceError as e:\n    print('ERR', e)\n")
    r = _run_without_simulator(code)
    assert r.returncode == 0, r.stderr
    if "ERR" not in r.stdout:
        pytest.skip("this machine has a real GPU")
    assert "['cpu']" in r.stdout
    err = r.stdout.split("ERR", 1)[1]
    assert "device 'cuda'" in err and ("driver" in err or "GPU" in err or "numba-cuda" in err), err
    assert "Traceback" not in r.stdout + r.stderr


def test_missing_numba_cuda_says_how_to_install(monkeypatch):
    import importlib.util

    from numba import config

    real = importlib.util.find_spec
    monkeypatch.setattr(config, "ENABLE_CUDASIM", 0)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    with pytest.raises(DeviceError, match=r'numba-cuda package is not installed; pip install "nbformer\[cuda\]"'):
        devices._cuda_module()


def test_cli_device_without_gpu_is_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-m", "cli.main", "generate", "And God said", "-n", "2", "--device", "cuda"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if r.returncode == 0:
        pytest.skip("this machine has a real GPU")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: device 'cuda'"), r.stderr


def test_unknown_device_in_the_registry_is_a_graph_error():
    with pytest.raises(GraphError, match="'tpu'"):
        ops.get("linear", "tpu")


# ---------------------------------------------------------------- memory checks before allocating
def _tiny_ckpt():
    from nbformer.config import ModelConfig
    from nbformer.weights import Checkpoint
    from nbformer.weights.params import param_shapes

    cfg = ModelConfig(arch="decoder", vocab_size=50, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_positions=32,
                      norm="pre", final_layernorm=True)
    rng = np.random.default_rng(0)
    params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in param_shapes(cfg).items()}
    return Checkpoint(cfg, params, [], Path("tiny-test-model"))


@pytest.mark.skipif(not SIMULATED, reason="patches the simulated GPU's free memory")
def test_model_larger_than_free_device_memory_is_refused_before_allocating(monkeypatch):
    from nbformer.devices import CudaDevice
    from nbformer.model import Model

    allocated = []
    monkeypatch.setattr(CudaDevice, "free_bytes", lambda self: 1000)
    monkeypatch.setattr(CudaDevice, "total_bytes", lambda self: 4000)
    monkeypatch.setattr(CudaDevice, "upload", lambda self, host: allocated.append(host.nbytes))
    with pytest.raises(DeviceError) as e:
        Model(_tiny_ckpt(), device="cuda")
    msg = str(e.value)
    assert "parameters of tiny-test-model" in msg and "needs" in msg and "0.0 MiB" in msg, msg
    assert not allocated


@pytest.mark.skipif(not SIMULATED, reason="patches the simulated GPU's free memory")
def test_kv_cache_and_arena_larger_than_free_memory_are_refused(monkeypatch):
    from nbformer.devices import CudaDevice
    from nbformer.model import Model

    m = Model(_tiny_ckpt(), device="cuda")
    monkeypatch.setattr(CudaDevice, "free_bytes", lambda self: 1024)
    with pytest.raises(DeviceError, match="KV cache"):
        m.session(4, 32)
    with pytest.raises(DeviceError, match="activation arena"):
        m.forward(np.zeros((2, 8), np.int64))
