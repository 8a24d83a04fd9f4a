"""nbformer/jit_cache.py: a cached kernel is compiled again when a module it imports changes,
not only its own file (Numba's stamp covers the defining file alone)."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import nbformer
from nbformer import jit_cache

PKG = os.path.dirname(nbformer.__file__)


def _rel(paths):
    return {os.path.relpath(p, os.path.dirname(PKG)).replace(os.sep, "/") for p in paths}


def test_dependency_files_follow_module_level_imports():
    deps = _rel(jit_cache.dependency_files(os.path.join(PKG, "kernels", "cpu", "attention_backward.py")))
    # the micro-kernel and exp2 are compiled into the attention backward kernels
    assert {"nbformer/kernels/cpu/microkernel.py", "nbformer/kernels/cpu/attention.py",
            "nbformer/kernels/cpu/attention_backward_tile.py",
            "nbformer/kernels/cpu/rng.py", "nbformer/kernels/cpu/attention_backward.py"} <= deps
    # quant/formats.py's block sizes are constants of the quantized kernels (a `from ...x import` two levels up)
    assert "nbformer/quant/formats.py" in _rel(jit_cache.dependency_files(os.path.join(PKG, "kernels", "cpu",
                                                                                       "qlinear.py")))
    # imports inside functions reach no compiled code: the CLI-facing modules stay out
    assert not any(p.startswith("nbformer/model") for p in deps)


def test_statements_join_continuations():
    src = "from .a import (x,\n    y)  # c\nimport nbformer.b as q, os\n    from .c import z\nfrom . import d, \\\n  e\n"
    got = list(jit_cache._statements(src))
    assert got[0].split() == ["from", ".a", "import", "x,", "y"]
    assert got[1] == "import nbformer.b as q, os"
    assert got[2].split() == ["from", ".", "import", "d,", "e"]
    assert len(got) == 3  # the indented (function-level) import is not module-level


def test_stamp_changes_with_a_dependency_and_not_otherwise(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    for p in (a, b, c):
        p.write_text("x = 1\n")
    saved = dict(jit_cache._files), dict(jit_cache._closures)
    try:
        deps = {str(a): [str(b)], str(b): [], str(c): []}
        orig_imports = jit_cache._imports
        jit_cache._imports = lambda path, text: deps[path]
        s0 = jit_cache.source_stamp(a)
        jit_cache._files.clear(); jit_cache._closures.clear()
        c.write_text("x = 2\n")
        assert jit_cache.source_stamp(a) == s0  # c is not a dependency of a
        jit_cache._files.clear(); jit_cache._closures.clear()
        b.write_text("x = 2\n")
        assert jit_cache.source_stamp(a) != s0
    finally:
        jit_cache._imports = orig_imports
        jit_cache._files.clear(); jit_cache._files.update(saved[0])
        jit_cache._closures.clear(); jit_cache._closures.update(saved[1])


def test_every_cached_dispatcher_uses_the_dependency_stamp():
    """Each nbformer module with an njit(cache=True) kernel must install the locators before it."""
    import importlib

    from numba.core.registry import CPUDispatcher

    found = 0
    for root, _, files in os.walk(PKG):
        if "__pycache__" in root or os.sep + "cuda" in root[len(PKG):]:
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            with open(path) as fh:
                if "cache=True" not in fh.read():
                    continue
            mod = importlib.import_module(jit_cache._dotted_of(path))
            for name, obj in vars(mod).items():
                if isinstance(obj, CPUDispatcher) and getattr(obj, "_cache", None) is not None \
                        and obj.py_func.__module__ == mod.__name__ and hasattr(obj._cache, "_impl"):
                    assert type(obj._cache._impl.locator).__name__.startswith("Nbformer"), f"{mod.__name__}.{name}"
                    found += 1
    assert found > 30


_RUN = textwrap.dedent("""
    import hashlib, sys, numpy as np
    from nbformer.kernels.cpu.dropout import dropout_forward, _dropout
    x = np.ones(4096, np.float32)
    out = np.empty_like(x)
    dropout_forward(out, x, 0.5, 7)
    print("cached" if _dropout.stats.cache_hits else "compiled", int((out != 0).sum()), hashlib.sha256(out.tobytes()).hexdigest())
""")


def test_kernel_recompiles_when_an_imported_module_changes(tmp_path):
    """dropout's kernel inlines rng.keep from rng.py: changing rng.py must not leave the old mask."""
    pkg = tmp_path / "src" / "nbformer"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "NUMBA_NUM_THREADS": "2"}

    def run():
        r = subprocess.run([sys.executable, "-c", _RUN], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    first = run()
    assert first[0] == "compiled"
    again = run()
    assert again == ["cached"] + first[1:]  # untouched sources: the cache is used
    rng = pkg / "kernels" / "cpu" / "rng.py"
    src = rng.read_text()
    assert "0x9E3779B97F4A7C15" in src
    rng.write_text(src.replace("0x9E3779B97F4A7C15", "0x9E3779B97F4A7C17"))  # another counter stream
    changed = run()
    assert changed[0] == "compiled"  # Numba's own stamp (dropout.py unchanged) would load the old code
    assert changed[1:] != first[1:]
    assert 1800 < int(changed[1]) < 2300  # still about half kept
    assert run() == ["cached"] + changed[1:]


def test_cuda_cache_gets_the_same_locators():
    """numba-cuda keeps its own locator classes (a real GPU's cache=True kernels); checked without one."""
    caching = pytest.importorskip("numba.cuda.core.caching")
    jit_cache.install_cuda()
    jit_cache.install_cuda()  # idempotent
    classes = caching.CacheImpl._locator_classes
    names = [c.__name__ for c in classes]
    assert names[:3] == ["NbformerUserProvidedCacheLocator", "NbformerInTreeCacheLocator",
                         "NbformerUserWideCacheLocator"]
    assert names.count("NbformerInTreeCacheLocator") == 1
    path = os.path.join(PKG, "kernels", "cuda", "attention.py")

    def f():
        pass

    loc = classes[1].from_function(f, path)
    assert loc is not None and loc.get_source_stamp() == jit_cache.source_stamp(path)
    assert classes[1].from_function(f, __file__) is None  # files outside the package: Numba's own
