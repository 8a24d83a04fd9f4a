"""Binds graph ops to the CPU kernels. Each adapter maps a node's roles to a kernel's arguments."""
from ...ops import register
from .attention import attention_forward
from .elementwise import add_forward, take_rows
from .embedding import embedding_forward
from .layernorm import layernorm_forward
from .linear import linear_forward
from .pooling import l2_normalize, pool
from .sampling import sample_token
from .softmax import log_softmax_forward, softmax_forward

DEV = "cpu"


@register("embedding", DEV)
def _embedding(out, ids, wte, pos_ids=None, wpe=None, type_ids=None, wtt=None, scale=1.0, padding_idx=-1):
    embedding_forward(out, ids, wte, pos_ids, wpe, type_ids, wtt, scale)


@register("layernorm", DEV)
def _layernorm(out, mean, rstd, x, w, b, eps):
    layernorm_forward(out, mean, rstd, x, w, b, eps)


@register("linear", DEV)
def _linear(out, x, w, b=None, residual=None, pre=None, act="none"):
    if pre is None:
        linear_forward(out, x, w, b, act, residual)
    else:
        from .linear import linear_forward_train

        linear_forward_train(out, pre, x, w, b, act, residual)


@register("kv_write", DEV)
def _kv_write(cache, qkv, pos, offset):
    from .kv_cache import kv_write

    kv_write(cache, qkv, offset, pos[0])


@register("attention", DEV)
def _attention(out, lse, q, kv, key_mask, n_heads, head_size, q_off, k_off, v_off, causal, scale, seed=None,
               dropout_p=0.0, stream=0, cache_pos=None):
    if cache_pos is not None:  # decoding: the keys are the cache's first cache_pos + Tq rows
        L = int(cache_pos[0]) + q.shape[1]
        kv, key_mask = kv[:, :L], key_mask[:, :L]
    if dropout_p > 0:
        attention_forward(out, lse, q, q_off, kv, k_off, v_off, key_mask, n_heads, head_size, causal, scale,
                          dropout_p=dropout_p, seed=_node_seed(seed, stream))
    else:
        attention_forward(out, lse, q, q_off, kv, k_off, v_off, key_mask, n_heads, head_size, causal, scale)


@register("add", DEV)
def _add(out, a, b):
    add_forward(out, a, b)


@register("take_rows", DEV)
def _take_rows(out, x, idx):
    take_rows(out, x, idx)


@register("softmax", DEV)
def _softmax(out, x):
    softmax_forward(out, x)


@register("log_softmax", DEV)
def _log_softmax(out, x):
    log_softmax_forward(out, x)


@register("sample", DEV)
def _sample(logits, temperature, top_k, top_p, u):
    return sample_token(logits, temperature, top_k, top_p, u)


@register("pool", DEV)
def _pool(out, x, mask, mode):
    pool(out, x, mask, mode)


@register("l2_normalize", DEV)
def _l2_normalize(out, x):
    if out is not x:
        out[...] = x
    l2_normalize(out)


# ---------------------------------------------------------------- training: forward extras
def _node_seed(seed, stream) -> int:
    """Per-site dropout seed from the step's seed (a (1,) int64 input) and the site's stream id."""
    return ((int(seed[0]) & 0xFFFFFFFFFFF) << 16) ^ int(stream)


@register("dropout", DEV)
def _dropout(out, x, seed, p, stream):
    from .dropout import dropout_forward

    dropout_forward(out, x, p, _node_seed(seed, stream), 0)


@register("cross_entropy", DEV)
def _cross_entropy(losses, lse, logits, targets, label_smoothing, ignore_index, vocab):
    from .loss import cross_entropy_forward

    cross_entropy_forward(losses.reshape(-1), lse.reshape(-1), logits.reshape(-1, vocab), targets.reshape(-1),
                          label_smoothing, ignore_index)


# ---------------------------------------------------------------- training: backward
@register("embedding", DEV, "backward")
def _embedding_bwd(dout, ids, dwte=None, dwpe=None, dwtt=None, pos_ids=None, type_ids=None, scale=1.0,
                   padding_idx=-1):
    from .embedding import embedding_backward

    embedding_backward(dwte, dwpe, dwtt, dout, ids, pos_ids, type_ids, scale)
    if dwte is not None and padding_idx >= 0:
        dwte[padding_idx] = 0.0  # nn.Embedding(padding_idx=...) semantics


@register("layernorm", DEV, "backward")
def _layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd):
    from .layernorm import layernorm_backward

    layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)


@register("linear", DEV, "backward")
def _linear_bwd(dw, dout, x, w, dx=None, db=None, pre=None, scratch=None, act="none"):
    from .linear import linear_backward

    linear_backward(dx, dw, db, dout, x, w, pre, act, scratch)


@register("dropout", DEV, "backward")
def _dropout_bwd(dx, dout, seed, p, stream):
    from .dropout import dropout_backward

    dropout_backward(dx, dout, p, _node_seed(seed, stream), 0)


@register("cross_entropy", DEV, "backward")
def _cross_entropy_bwd(dlogits, logits, lse, targets, dloss, label_smoothing, ignore_index, vocab):
    from .loss import cross_entropy_backward

    cross_entropy_backward(dlogits.reshape(-1, vocab), logits.reshape(-1, vocab), lse.reshape(-1),
                           targets.reshape(-1), label_smoothing, ignore_index, float(dloss[0]))


@register("attention", DEV, "backward")
def _attention_bwd(dq, delta, dout, out, lse, q, kv, key_mask, n_heads, head_size, q_off, k_off, v_off, causal,
                   scale, dkv=None, seed=None, dropout_p=0.0, stream=0):
    from .attention_backward import attention_backward

    attention_backward(dq, dq if dkv is None else dkv, delta, dout, out, lse, q, q_off, kv, k_off, v_off,
                       key_mask, n_heads, head_size, causal, scale, dropout_p=dropout_p,
                       seed=0 if seed is None else _node_seed(seed, stream))


# ---------------------------------------------------------------- optimizer (flat buffers)
@register("adam", DEV)
def _adam(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    from .optim import adam_step

    adam_step(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled)


@register("grad_norm", DEV)
def _grad_norm(grads):
    from .optim import global_grad_norm

    return global_grad_norm(grads)


@register("scale", DEV)
def _scale(x, factor):
    from .optim import scale_

    scale_(x, factor)
