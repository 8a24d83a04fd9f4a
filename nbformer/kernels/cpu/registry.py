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
def _embedding(out, ids, wte, pos_ids=None, wpe=None, type_ids=None, wtt=None, scale=1.0):
    embedding_forward(out, ids, wte, pos_ids, wpe, type_ids, wtt, scale)


@register("layernorm", DEV)
def _layernorm(out, mean, rstd, x, w, b, eps):
    layernorm_forward(out, mean, rstd, x, w, b, eps)


@register("linear", DEV)
def _linear(out, x, w, b=None, residual=None, act="none"):
    linear_forward(out, x, w, b, act, residual)


@register("attention", DEV)
def _attention(out, lse, q, kv, key_mask, n_heads, head_size, q_off, k_off, v_off, causal, scale):
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
