"""A few small, awkward launches of nbformer's CUDA attention forward and linear, for
`compute-sanitizer --tool racecheck` / `--tool memcheck` (benchmarks/gpu/check.sh runs it under both).

The launches, each checked against a float64 numpy reference (so that a sanitizer run also shows
the kernels did real work: the script prints one line per launch and "SANITIZE OK" at the end):
  1. attention, self-attention on a fused qkv buffer (q_buf is kv_buf, offsets 0 / C / 2C),
     B=2, T=33, 3 heads of 24, causal, row 1 left-padded by 5 keys;
  2. attention, one decoding query over a KV-cache prefix: Tq=1, key_len=33 of a 40-row buffer,
     row 0 with its first 3 keys masked;
  3. linear, tiled path: x (2, 33, 40) @ w (72, 40)^T + b, GELU, + residual;
  4. linear, few-row (decoding) path: x (3, 40) @ w (72, 40)^T + b, no activation.
The tile tunables are the kernels' defaults on a GPU (what the models run); under the simulator
(NUMBA_ENABLE_CUDASIM=1, to try the script without a GPU) attention uses small tiles instead.

    PYTHONPATH=. python3 benchmarks/gpu/sanitize_attention.py            # on a GPU
    compute-sanitizer --tool racecheck python3 benchmarks/gpu/sanitize_attention.py
    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python benchmarks/gpu/sanitize_attention.py   # logic only
Exit status: 0 when every launch ran and matched, 1 otherwise (a kernel that is still missing
counts as a failure and is named).
"""
from __future__ import annotations

import math
import sys
import traceback

import numpy as np

TOL = 2e-4  # |got - float64 reference| <= TOL * (1 + |ref|); fp32 kernels at these sizes are ~1e-6


def ref_attention(q_buf, q_off, kv_buf, k_off, v_off, key_mask, NH, HS, causal, scale, key_len=None):
    """float64 reference with the kernels' semantics: bottom-right aligned causal mask,
    only the first key_len keys, rows that see no key -> out 0, lse -inf."""
    q_buf, kv_buf = q_buf.astype(np.float64), kv_buf.astype(np.float64)
    B, Tq, _ = q_buf.shape
    Tk = kv_buf.shape[1] if key_len is None else key_len
    out = np.zeros((B, Tq, NH * HS))
    lse = np.full((B, NH, Tq), -np.inf)
    for b in range(B):
        for h in range(NH):
            q = q_buf[b, :, q_off + h * HS: q_off + (h + 1) * HS]
            k = kv_buf[b, :Tk, k_off + h * HS: k_off + (h + 1) * HS]
            v = kv_buf[b, :Tk, v_off + h * HS: v_off + (h + 1) * HS]
            s = scale * q @ k.T
            vis = np.broadcast_to(key_mask[b, :Tk].astype(bool), s.shape).copy()
            if causal:
                i = np.arange(Tq)[:, None]
                j = np.arange(Tk)[None, :]
                vis &= j <= i + (Tk - Tq)
            s = np.where(vis, s, -np.inf)
            for i in range(Tq):
                if not vis[i].any():
                    continue
                m = s[i].max()
                p = np.exp(s[i] - m)
                lse[b, h, i] = m + math.log(p.sum())
                out[b, i, h * HS:(h + 1) * HS] = (p / p.sum()) @ v
    return out, lse


def ref_linear(x, w, b, act, r):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        y = y + b
    if act == "gelu":
        from math import erf

        y = 0.5 * y * (1.0 + np.vectorize(erf)(y / math.sqrt(2.0)))
    elif act != "none":
        raise ValueError(act)
    if r is not None:
        y = y + r
    return y


def _compare(what, got, want):
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(got[~finite], want[~finite]):
        raise AssertionError(f"{what}: infinities / NaNs differ from the reference")
    err = np.abs(got[finite].astype(np.float64) - want[finite])
    worst = float((err / (1.0 + np.abs(want[finite]))).max()) if err.size else 0.0
    if not worst <= TOL:
        raise AssertionError(f"{what}: relative error {worst:.2e} > {TOL:.0e}")
    return float(err.max()) if err.size else 0.0


def main() -> int:
    from numba import config, cuda

    sim = bool(config.ENABLE_CUDASIM)
    rng = np.random.default_rng(0)
    failures = []

    def launch(name, fn):
        try:
            msg = fn()
            cuda.synchronize()
            print(f"ok   {name}: {msg}", flush=True)
        except Exception as e:  # keep going: the other launches still give the sanitizer work
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)

    att_tiles = dict(block_q=16, block_k=16, threads=32) if sim else {}

    def attention_fused_causal_padded():
        from nbformer.kernels.cuda.attention import attention_forward

        B, T, NH, HS = 2, 33, 3, 24
        C = NH * HS
        qkv = rng.normal(size=(B, T, 3 * C)).astype(np.float32)
        mask = np.ones((B, T), np.uint8)
        mask[1, :5] = 0  # left padding
        scale = 1.0 / math.sqrt(HS)
        d_qkv, d_mask = cuda.to_device(qkv), cuda.to_device(mask)
        out = cuda.to_device(np.full((B, T, C), np.nan, np.float32))
        lse = cuda.to_device(np.full((B, NH, T), np.nan, np.float32))
        attention_forward(out, lse, d_qkv, 0, d_qkv, C, 2 * C, d_mask, NH, HS, True, scale, **att_tiles)
        want_o, want_l = ref_attention(qkv, 0, qkv, C, 2 * C, mask, NH, HS, True, scale)
        e1 = _compare("out", out.copy_to_host(), want_o)
        e2 = _compare("lse", lse.copy_to_host(), want_l)
        return f"B={B} T={T} NH={NH} HS={HS} fused qkv, causal, padded: max |err| out {e1:.1e}, lse {e2:.1e}"

    def attention_decode_prefix():
        from nbformer.kernels.cuda.attention import attention_forward

        B, Tmax, L, NH, HS = 2, 40, 33, 3, 24
        C = NH * HS
        q = rng.normal(size=(B, 1, C)).astype(np.float32)
        kv = rng.normal(size=(B, Tmax, 2 * C)).astype(np.float32)
        kv[:, L:] = np.nan  # beyond key_len: must never be read into the result
        mask = np.ones((B, Tmax), np.uint8)
        mask[0, :3] = 0
        scale = 1.0 / math.sqrt(HS)
        out = cuda.to_device(np.full((B, 1, C), np.nan, np.float32))
        lse = cuda.to_device(np.full((B, NH, 1), np.nan, np.float32))
        attention_forward(out, lse, cuda.to_device(q), 0, cuda.to_device(kv), 0, C, cuda.to_device(mask),
                          NH, HS, True, scale, key_len=L, **att_tiles)
        want_o, want_l = ref_attention(q, 0, kv, 0, C, mask, NH, HS, True, scale, key_len=L)
        e1 = _compare("out", out.copy_to_host(), want_o)
        e2 = _compare("lse", lse.copy_to_host(), want_l)
        return f"Tq=1 key_len={L} of {Tmax} (NaN beyond), causal, masked: max |err| out {e1:.1e}, lse {e2:.1e}"

    def linear_case(lead, act, residual):
        def run():
            from nbformer.kernels.cuda import linear as L

            K, M = 40, 72
            x = rng.normal(size=lead + (K,)).astype(np.float32)
            w = (rng.normal(size=(M, K)) / math.sqrt(K)).astype(np.float32)
            b = rng.normal(size=M).astype(np.float32)
            r = rng.normal(size=lead + (M,)).astype(np.float32) if residual else None
            out = cuda.to_device(np.full(lead + (M,), np.nan, np.float32))
            L.linear_forward(out, cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), act,
                             None if r is None else cuda.to_device(r))
            e = _compare("out", out.copy_to_host(), ref_linear(x, w, b, act, r))
            n = int(np.prod(lead))
            path = "few-row" if n <= L.TUNABLES["few_rows"] else "tiled"
            return f"x {lead + (K,)} w ({M}, {K}) {act}{' +residual' if residual else ''} ({path} path): max |err| {e:.1e}"
        return run

    launch("attention fused qkv causal padded", attention_fused_causal_padded)
    launch("attention decode over a cache prefix", attention_decode_prefix)
    launch("linear tiled", linear_case((2, 33), "gelu", True))
    launch("linear few rows", linear_case((3,), "none", False))
    name = "simulated" if sim else cuda.get_current_device().name
    print(f"simulator: {sim}; device: {name.decode() if isinstance(name, bytes) else name}")
    if failures:
        print(f"SANITIZE FAILED: {len(failures)} launch(es): {', '.join(failures)}")
        return 1
    print("SANITIZE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
