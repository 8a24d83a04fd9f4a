"""Graph ops of quantized linear layers: 'qlinear' and 'qlinear_glu', registered for every device
kind whose kernels/<kind>/qlinear.py has the launchers (same names and signatures on CPU and CUDA).

  qlinear      out = act(x @ W.T + b) [+ residual]         inputs x, w (the '<name>.q' uint8 bytes),
                                                          b, residual; attrs act, qtype
  qlinear_glu  out = act(x @ Wg.T + bg) * (x @ Wu.T + bu)  inputs x, w, b; attrs act, qtype

Forward only: a quantized model is not trained (the graph builder refuses training graphs).
"""
from __future__ import annotations

import importlib

from ..ops import register


def install(kind: str):
    try:
        mod = importlib.import_module(f"nbformer.kernels.{kind}.qlinear")
    except ModuleNotFoundError as e:
        if e.name != f"nbformer.kernels.{kind}.qlinear":
            raise
        return

    if hasattr(mod, "qlinear_forward"):
        @register("qlinear", kind)
        def _qlinear(out, x, w, b=None, residual=None, act="none", qtype="q8_0", **tuned):
            mod.qlinear_forward(out, x, w, qtype, b, act, residual, **tuned)  # tuned: nbformer.tuning

    if hasattr(mod, "qlinear_glu_forward"):
        @register("qlinear_glu", kind)
        def _qlinear_glu(out, x, w, b=None, act="silu", qtype="q8_0", **tuned):
            mod.qlinear_glu_forward(out, x, w, qtype, b, act, **tuned)
