"""Op adapters, written once for every device: each maps a graph node's roles and attrs to the
arguments of a kernel launcher.

`kernels/cpu/` and `kernels/cuda/` hold launchers of the same names and signatures (outputs
first) in files of the same names, so an adapter only says which launcher of which file, and
`install(kind)` registers it for that device kind. Logic that is the same on every device (the
per-site dropout seed, the padding_idx row of nn.Embedding, role renaming, the key length of a
KV-cache prefix) lives here and nowhere else. An op is registered for a device only if that
device's file has the launcher, so a missing kernel is a clear "no kernel registered" error when
the executor is built, not a failure half-way through a run.

Launchers are looked up at call time (one getattr), so tests may patch a kernel module's launcher.
"""
from __future__ import annotations

import importlib
import inspect

import numpy as np

from ..errors import GraphError
from ..ops import register


_GQA_LAUNCHERS = {}  # launcher -> whether it takes n_kv_heads


def kv_heads_kw(fn, kind, n_heads, n_kv_heads) -> dict:
    """{'n_kv_heads': NKV} for grouped-query attention (NKV < NH), {} otherwise, so that launchers
    without grouped-query support keep serving every other model; a GQA node on such a device is a
    clear error, not a wrong result."""
    if n_kv_heads is None or int(n_kv_heads) == int(n_heads):
        return {}
    ok = _GQA_LAUNCHERS.get(fn)
    if ok is None:
        ok = _GQA_LAUNCHERS[fn] = "n_kv_heads" in inspect.signature(fn).parameters
    if not ok:
        raise GraphError(f"attention on device '{kind}': grouped-query attention (n_kv_heads = {n_kv_heads} < "
                         f"n_heads = {n_heads}) has no kernel on this device yet")
    return {"n_kv_heads": int(n_kv_heads)}


def node_seed(seed, stream) -> int:
    """Per-site dropout seed from the step's seed (a (1,) int64 host input) and the site's stream id."""
    return ((int(seed[0]) & 0xFFFFFFFFFFF) << 16) ^ int(stream)


class _Kernels:
    """Launchers of one device kind: kernels.get('linear', 'linear_forward')."""

    def __init__(self, kind: str):
        self.kind, self._mods = kind, {}

    def module(self, family):
        mod = self._mods.get(family)
        if mod is None:
            mod = self._mods[family] = importlib.import_module(f"nbformer.kernels.{self.kind}.{family}")
        return mod

    def has(self, family, name) -> bool:
        try:
            return hasattr(self.module(family), name)
        except ModuleNotFoundError:
            return False

    def get(self, family, name):
        return getattr(self.module(family), name)


def install(kind: str):
    """Register every op whose launcher exists in nbformer/kernels/<kind>/ for that device kind."""
    K = _Kernels(kind)

    def op(name, family, launcher, direction="forward"):
        def deco(fn):
            if K.has(family, launcher):
                register(name, kind, direction)(fn)
            return fn

        return deco

    # ------------------------------------------------------------ inference
    @op("embedding", "embedding", "embedding_forward")
    def _embedding(out, ids, wte, pos_ids=None, wpe=None, type_ids=None, wtt=None, scale=1.0, padding_idx=-1):
        K.get("embedding", "embedding_forward")(out, ids, wte, pos_ids, wpe, type_ids, wtt, scale)

    @op("layernorm", "layernorm", "layernorm_forward")
    def _layernorm(out, mean, rstd, x, w, b, eps, **tuned):
        K.get("layernorm", "layernorm_forward")(out, mean, rstd, x, w, b, eps, **tuned)

    @op("linear", "linear", "linear_forward")
    def _linear(out, x, w, b=None, residual=None, pre=None, act="none", **tuned):
        # tuned: launcher keywords the executor bound from the tuning cache (nbformer.tuning.runtime)
        if pre is None:
            K.get("linear", "linear_forward")(out, x, w, b, act, residual, **tuned)
        else:  # training: also keep the pre-activation for the backward pass
            K.get("linear", "linear_forward_train")(out, pre, x, w, b, act, residual)

    @op("kv_write", "kv_cache", "kv_write")
    def _kv_write(cache, qkv, pos, offset):
        K.get("kv_cache", "kv_write")(cache, qkv, offset, int(pos[0]))

    @op("attention", "attention", "attention_forward")
    def _attention(out, lse, q, kv, key_mask, n_heads, head_size, q_off, k_off, v_off, causal, scale, seed=None,
                   dropout_p=0.0, stream=0, cache_pos=None, n_kv_heads=None, **tuned):
        # decoding: the keys are the cache's first cache_pos + Tq rows (cache_pos: a (1,) host input)
        key_len = None if cache_pos is None else int(cache_pos[0]) + q.shape[1]
        if "tuned_by_key_len" in tuned:  # decoding: the config tuned for this key length's bucket
            table = tuned.pop("tuned_by_key_len")
            if key_len is not None:
                tuned = {**tuned, **table.get(1 if key_len <= 1 else 1 << (key_len - 1).bit_length(), {})}
        extra = {} if dropout_p <= 0 else {"dropout_p": dropout_p, "seed": node_seed(seed, stream)}
        fn = K.get("attention", "attention_forward")
        extra.update(kv_heads_kw(fn, kind, n_heads, n_kv_heads))
        fn(out, lse, q, q_off, kv, k_off, v_off, key_mask, n_heads, head_size, causal, scale, key_len=key_len, **extra,
           **tuned)

    @op("add", "elementwise", "add_forward")
    def _add(out, a, b):
        K.get("elementwise", "add_forward")(out, a, b)

    @op("take_rows", "elementwise", "take_rows")
    def _take_rows(out, x, idx):
        K.get("elementwise", "take_rows")(out, x, idx)

    @op("softmax", "softmax", "softmax_forward")
    def _softmax(out, x, **tuned):
        K.get("softmax", "softmax_forward")(out, x, **tuned)

    @op("log_softmax", "softmax", "log_softmax_forward")
    def _log_softmax(out, x, **tuned):
        K.get("softmax", "log_softmax_forward")(out, x, **tuned)

    @op("pool", "pooling", "pool")
    def _pool(out, x, mask, mode):
        K.get("pooling", "pool")(out, x, mask, mode)

    @op("l2_normalize", "pooling", "l2_normalize")
    def _l2_normalize(out, x):
        if out is not x:  # the executor gives aliased tensors one view object, so this is a real copy
            K.get("elementwise", "copy")(out, x)
        K.get("pooling", "l2_normalize")(out)

    @op("kv_reorder", "kv_cache", "reorder_rows")
    def _kv_reorder(cache, scratch, rows, length):
        K.get("kv_cache", "reorder_rows")(cache, scratch, rows, length)

    @op("sample", "sampling", "sample_token")
    def _sample(logits, temperature, top_k, top_p, u):
        """One host row of logits (V,) -> token id (the host-side sampler, after host processors)."""
        return K.get("sampling", "sample_token")(logits, temperature, top_k, top_p, u)

    @op("sample_rows", "sampling", "sample_rows")
    def _sample_rows(logits, temperature, top_k, top_p, u):
        """logits (N, V) on the device, u (N,) host uniforms -> (N,) int64 host ids."""
        return K.get("sampling", "sample_rows")(logits, temperature, top_k, top_p, np.asarray(u, np.float64))

    # ------------------------------------------------------------ training: forward extras
    @op("dropout", "dropout", "dropout_forward")
    def _dropout(out, x, seed, p, stream):
        K.get("dropout", "dropout_forward")(out, x, p, node_seed(seed, stream), 0)

    @op("cross_entropy", "loss", "cross_entropy_forward")
    def _cross_entropy(losses, lse, logits, targets, label_smoothing, ignore_index, vocab, dlogits=None, dloss=None,
                       **tuned):
        if dlogits is None:
            K.get("loss", "cross_entropy_forward")(losses.reshape(-1), lse.reshape(-1), logits.reshape(-1, vocab),
                                                   targets.reshape(-1), label_smoothing, ignore_index, **tuned)
        else:  # the training graph's loss with its backward (graph.build.fuse_cross_entropy)
            K.get("loss", "cross_entropy_fused")(losses.reshape(-1), lse.reshape(-1), dlogits.reshape(-1, vocab),
                                                 logits.reshape(-1, vocab), targets.reshape(-1), label_smoothing,
                                                 ignore_index, float(dloss[0]), **tuned)

    # ------------------------------------------------------------ training: backward
    @op("embedding", "embedding", "embedding_backward", "backward")
    def _embedding_bwd(dout, ids, dwte=None, dwpe=None, dwtt=None, pos_ids=None, type_ids=None, scale=1.0,
                       padding_idx=-1):
        K.get("embedding", "embedding_backward")(dwte, dwpe, dwtt, dout, ids, pos_ids, type_ids, scale)
        if dwte is not None and padding_idx >= 0:
            K.get("elementwise", "zero_row")(dwte, padding_idx)  # nn.Embedding(padding_idx=...) semantics

    @op("layernorm", "layernorm", "layernorm_backward", "backward")
    def _layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, **tuned):
        K.get("layernorm", "layernorm_backward")(dx, dw, db, dout, x, w, mean, rstd, **tuned)

    @op("linear", "linear", "linear_backward", "backward")
    def _linear_bwd(dw, dout, x, w, dx=None, db=None, pre=None, scratch=None, act="none"):
        K.get("linear", "linear_backward")(dx, dw, db, dout, x, w, pre, act, scratch)

    @op("dropout", "dropout", "dropout_backward", "backward")
    def _dropout_bwd(dx, dout, seed, p, stream):
        K.get("dropout", "dropout_backward")(dx, dout, p, node_seed(seed, stream), 0)

    @op("cross_entropy", "loss", "cross_entropy_backward", "backward")
    def _cross_entropy_bwd(dlogits, logits, lse, targets, dloss, label_smoothing, ignore_index, vocab, **tuned):
        K.get("loss", "cross_entropy_backward")(dlogits.reshape(-1, vocab), logits.reshape(-1, vocab),
                                                lse.reshape(-1), targets.reshape(-1), label_smoothing,
                                                ignore_index, float(dloss[0]), **tuned)

    @op("attention", "attention_backward", "attention_backward", "backward")
    def _attention_bwd(dq, delta, dout, out, lse, q, kv, key_mask, n_heads, head_size, q_off, k_off, v_off, causal,
                       scale, dkv=None, seed=None, dropout_p=0.0, stream=0, n_kv_heads=None, **tuned):
        fn = K.get("attention_backward", "attention_backward")
        fn(dq, dq if dkv is None else dkv, delta, dout, out, lse, q, q_off, kv, k_off, v_off, key_mask, n_heads,
           head_size, causal, scale, dropout_p=dropout_p, seed=0 if seed is None else node_seed(seed, stream),
           **kv_heads_kw(fn, kind, n_heads, n_kv_heads), **tuned)

    # ------------------------------------------------------------ Llama family: RMSNorm, RoPE, gated FFN
    @op("rmsnorm", "rmsnorm", "rmsnorm_forward")
    def _rmsnorm(out, rstd, x, w, eps, **tuned):
        K.get("rmsnorm", "rmsnorm_forward")(out, rstd, x, w, eps, **tuned)

    @op("rmsnorm", "rmsnorm", "rmsnorm_backward", "backward")
    def _rmsnorm_bwd(dx, dw, dout, x, w, rstd, **tuned):
        K.get("rmsnorm", "rmsnorm_backward")(dx, dw, dout, x, w, rstd, **tuned)

    @op("rope", "rope", "rope_forward")
    def _rope(out, x, pos_ids, inv_freq, n_heads, n_kv_heads, head_size):
        # in place on the q/k columns: out is x when the planner aliased them, else a copy first
        if out is not x:
            K.get("elementwise", "copy")(out, x)
        K.get("rope", "rope_forward")(out, pos_ids, inv_freq, n_heads, n_kv_heads, head_size)

    @op("rope", "rope", "rope_backward", "backward")
    def _rope_bwd(dx, dout, pos_ids, inv_freq, n_heads, n_kv_heads, head_size):
        if dx is not dout:
            K.get("elementwise", "copy")(dx, dout)
        K.get("rope", "rope_backward")(dx, pos_ids, inv_freq, n_heads, n_kv_heads, head_size)

    @op("linear_glu", "swiglu", "swiglu_linear_forward")
    def _linear_glu(out, x, w, b=None, pre=None, act="silu", **tuned):
        if pre is None:
            K.get("swiglu", "swiglu_linear_forward")(out, x, w, b, act, **tuned)
        else:  # training: also keep gate | up for the backward pass
            K.get("swiglu", "swiglu_linear_forward_train")(out, pre, x, w, b, act)

    @op("glu", "swiglu", "swiglu_backward", "backward")
    def _glu_bwd(dpre, dout, pre, act="silu"):
        K.get("swiglu", "swiglu_backward")(dpre, dout, pre, act)

    # ------------------------------------------------------------ optimizer (flat buffers)
    @op("adam", "optim", "adam_step")
    def _adam(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
        K.get("optim", "adam_step")(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled)

    @op("grad_norm", "optim", "global_grad_norm")
    def _grad_norm(grads):
        return K.get("optim", "global_grad_norm")(grads)

    @op("clip_grad", "optim", "clip_by_global_norm_")
    def _clip_grad(grads, max_norm, stats, slot):
        K.get("optim", "clip_by_global_norm_")(grads, max_norm, stats, slot)

    @op("mean_loss", "optim", "mean_loss_")
    def _mean_loss(stats, slot, losses, count):
        K.get("optim", "mean_loss_")(stats, slot, losses, count)

    @op("scale", "optim", "scale_")
    def _scale(x, factor):
        K.get("optim", "scale_")(x, factor)
