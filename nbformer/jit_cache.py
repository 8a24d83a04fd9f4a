"""Numba's on-disk cache, keyed by the source a kernel is built from, not only its own file.

Numba stamps a cached function with a hash of the file that defines it. A kernel's machine code also
holds the other nbformer modules it imports: the micro-kernel (microkernel.py) inlined into the
attention kernels, attention's exp2 in the linear layers' GELU, quant/formats.py's block sizes. With
Numba's stamp, an edit of microkernel.py alone, or an upgrade that changes only that file, leaves
the attention kernels loading their old code from the cache: old behaviour, silently.

`install()` puts three locators in front of Numba's (user-given NUMBA_CACHE_DIR, the package's
__pycache__, the user-wide cache: the same places as Numba's own) for files inside the nbformer
package. Their stamp hashes the defining file and every nbformer module it imports at module
level, transitively (`dependency_files`). A change in any of them makes the index entries stale, and
the kernel is compiled again (precompile.py's index check sees the same stamp, so the first-run
compile covers it). Modules that define cached kernels import this module first
(nbformer/kernels/__init__.py, nbformer/bench/_stream.py; install_cuda in kernels/cuda/_jit.py for
numba-cuda's own cache); tests/test_jit_cache.py checks that every cached dispatcher of the package
uses these locators.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(PACKAGE_DIR)  # the directory holding the nbformer package

# module-level imports only (column 0): jitted code sees the globals of its module, which module-level
# imports bind; imports inside functions do not reach compiled code.
_FROM = re.compile(r"^from\s+(\.*[\w.]*)\s+import\s+(.*)$")
_IMPORT = re.compile(r"^import\s+(.*)$")

_lock = threading.Lock()
_files: dict = {}  # path -> (content digest, [imported nbformer files])
_closures: dict = {}  # path -> stamp


def _module_file(dotted):
    """'nbformer.kernels.cpu.attention' -> its .py file (a package: its __init__.py), or None."""
    base = os.path.join(_ROOT, *dotted.split("."))
    if os.path.isfile(base + ".py"):
        return base + ".py"
    init = os.path.join(base, "__init__.py")
    return init if os.path.isfile(init) else None


def _dotted_of(path):
    rel = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _statements(text):
    """The module-level import statements of a source, parenthesised continuations joined."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not (line.startswith("from ") or line.startswith("import ")):
            continue
        line = line.split("#", 1)[0]
        if "(" in line:
            while ")" not in line and i < len(lines):
                line += " " + lines[i].split("#", 1)[0]
                i += 1
            line = line.replace("(", " ").replace(")", " ")
        else:
            while line.rstrip().endswith("\\") and i < len(lines):
                line = line.rstrip()[:-1] + " " + lines[i].split("#", 1)[0]
                i += 1
        yield line.strip()


def _imports(path, text):
    """The nbformer files that `path` imports at module level."""
    package = _dotted_of(path)
    if not path.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    found = []
    for stmt in _statements(text):
        m = _FROM.match(stmt)
        if m:
            mod, names = m.group(1), [n.split(" as ")[0].strip() for n in m.group(2).split(",")]
            if mod.startswith("."):
                level = len(mod) - len(mod.lstrip("."))
                parts = package.split(".")
                if level - 1 > len(parts):
                    continue
                base = ".".join(parts[: len(parts) - (level - 1)])
                mod = base + ("." + mod.lstrip(".") if mod.lstrip(".") else "")
            if mod != "nbformer" and not mod.startswith("nbformer."):
                continue
            f = _module_file(mod)
            if f:
                found.append(f)
            for n in names:  # `from .pkg import submodule`
                sub = _module_file(mod + "." + n) if n and n != "*" else None
                if sub:
                    found.append(sub)
            continue
        m = _IMPORT.match(stmt)
        if m:
            for n in m.group(1).split(","):
                mod = n.split(" as ")[0].strip()
                if mod == "nbformer" or mod.startswith("nbformer."):
                    f = _module_file(mod)
                    if f:
                        found.append(f)
    return found


def _scan(path):
    entry = _files.get(path)
    if entry is None:
        with open(path, "rb") as f:
            data = f.read()
        entry = (hashlib.sha256(data).digest(), _imports(path, data.decode("utf-8", "replace")))
        _files[path] = entry
    return entry


def dependency_files(py_file):
    """py_file and every nbformer module it imports at module level, transitively (sorted paths)."""
    start = os.path.abspath(py_file)
    seen, todo = set(), [start]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(_scan(p)[1])
    return sorted(seen)


def source_stamp(py_file):
    """The cache stamp of a function defined in py_file: a hash over its dependency files' contents."""
    path = os.path.abspath(py_file)
    with _lock:
        stamp = _closures.get(path)
        if stamp is None:
            h = hashlib.sha256()
            for p in dependency_files(path):
                h.update(os.path.relpath(p, _ROOT).encode())
                h.update(_scan(p)[0])
            stamp = _closures[path] = h.digest()
    return stamp


def in_package(py_file):
    try:
        return os.path.commonpath([os.path.abspath(py_file), PACKAGE_DIR]) == PACKAGE_DIR
    except ValueError:  # another drive (Windows)
        return False


_installed: set = set()


def _locator(base):
    class Locator(base):
        __doc__ = f"{base.__name__} for nbformer's files, stamped with their dependencies' source."

        def get_source_stamp(self):
            return source_stamp(self._py_file)

        @classmethod
        def from_function(cls, py_func, py_file):
            if not in_package(py_file):
                return None
            return super().from_function(py_func, py_file)

    Locator.__name__ = Locator.__qualname__ = "Nbformer" + base.__name__.lstrip("_")
    return Locator


def _install_into(caching, names):
    """Our locators, one per Numba locator class named, in front of caching.CacheImpl's list."""
    with _lock:
        if caching.__name__ in _installed:
            return
        classes = caching.CacheImpl._locator_classes
        classes[:0] = [_locator(getattr(caching, n)) for n in names]
        _installed.add(caching.__name__)


def install():
    """Put the dependency-stamped locators in front of Numba's (idempotent): for a user-given
    NUMBA_CACHE_DIR, the package's __pycache__ and the user-wide cache, the places Numba's own use.
    A user's NUMBA_CACHE_LOCATOR_CLASSES replaces Numba's list, and then is left as it is."""
    from numba.core import caching

    _install_into(caching, ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator"))


def install_cuda():
    """The same for numba-cuda's cache (CUDA kernels with cache=True; its own locator classes)."""
    from numba.cuda.core import caching

    _install_into(caching, ("_UserProvidedCacheLocator", "_InTreeCacheLocator", "_UserWideCacheLocator"))
