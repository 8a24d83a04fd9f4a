"""Training step: nbformer (forward + cross-entropy + backward + Adam) vs PyTorch, same process.

GPT-style decoder, d_model 256, 4 layers, 4 heads, d_ff 1024, vocab 8192, T=128, B=8, no dropout,
Adam(betas=(0.9, 0.98), eps=1e-9). Both start from the same weights and see the same batches.
Throughput in tokens/s (median of --repeat steps after --warmup, interleaved); ratio = nbformer /
torch (> 1: nbformer faster). Peak memory: nbformer's planned bytes (params + grads + Adam state +
activation arena) and the process RSS high-water mark growth of each side's first steps.

Also: attention backward alone at B=1, H=12, T=1024, head 64 (causal and not) vs
torch.nn.functional.scaled_dot_product_attention's backward.

    python benchmarks/bench_train.py [--threads 2] [--warmup 2] [--repeat 5]
"""
from __future__ import annotations

import resource
import time

from common import bench_args, ratio, round_ratios, set_threads, spread, timeit_pair, write_results


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    p = bench_args(__doc__.splitlines()[0], warmup=2, repeat=5)
    p.add_argument("--skip-attention", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)

    import numpy as np
    import torch
    import transformers

    from nbformer.config import ModelConfig
    from nbformer.graph.plan import plan_memory
    from nbformer.kernels.cpu.attention import attention_flops
    from nbformer.training.data import TokenData
    from nbformer.training.trainer import TrainOptions, Trainer, init_params
    from nbformer.weights import hf_gpt2

    B, T, V, C, L, H, F = 8, 128, 8192, 256, 4, 4, 1024
    cfg = ModelConfig(arch="decoder", vocab_size=V, d_model=C, n_heads=H, n_layers=L, d_ff=F, max_positions=T,
                      norm="pre", activation="gelu_tanh", final_layernorm=True)
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    data = TokenData(rng.integers(0, V, 200_000), eval_fraction=0.0)
    opts = TrainOptions(batch_size=B, seq_len=T, steps=10 ** 6, lr=1e-4, schedule="constant", warmup=0, clip=0.0,
                        optimizer="adam", eval_every=10 ** 6, save_every=10 ** 6)

    rss0 = rss_peak_mib()
    import tempfile

    tr = Trainer(cfg, params, data, opts, tempfile.mkdtemp(), "{}", progress=False)
    first_nb = tr.train_step()["loss"]
    rss_nb = rss_peak_mib() - rss0
    plan = plan_memory(tr.runner.graph)
    n = tr.flat.num_parameters
    planned = {"params": 4 * n, "grads": 4 * n, "adam": 8 * n, "arena": plan.arena_bytes}

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, n_inner=F, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    state = {}
    for r in hf_gpt2.rules(cfg, "transformer."):
        state.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.inverse(params[r.canonical]).items()})
    hf.load_state_dict(state, strict=False)
    opt = torch.optim.Adam(hf.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    step = {"t": 0}

    def torch_step():
        step["t"] += 1
        x, y = data.batch(0, step["t"], B, T)
        logits = hf(torch.from_numpy(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    rss1 = rss_peak_mib()
    first_torch = torch_step()
    rss_torch = rss_peak_mib() - rss1
    res = timeit_pair({"nbformer": tr.train_step, "torch": torch_step}, warmup=args.warmup, repeat=args.repeat)
    tps = {k: B * T / v["median_s"] for k, v in res.items()}
    rows = [
        {"impl": "nbformer Trainer.train_step", "median s": res["nbformer"]["median_s"], "tokens/s": tps["nbformer"],
         "peak MiB": f"planned {sum(planned.values()) / 2**20:.1f} (params {planned['params'] / 2**20:.1f}, "
                     f"grads {planned['grads'] / 2**20:.1f}, Adam {planned['adam'] / 2**20:.1f}, "
                     f"arena {planned['arena'] / 2**20:.1f}); RSS growth {rss_nb:.0f}"},
        {"impl": "torch GPT2LMHeadModel + Adam", "median s": res["torch"]["median_s"], "tokens/s": tps["torch"],
         "peak MiB": f"RSS growth {rss_torch:.0f}"},
        {"impl": "ratio nbformer/torch", "tokens/s": ratio(tps["nbformer"], tps["torch"]),
         "ratio per round": spread(round_ratios(res))},
    ]
    notes = [f"B={B}, T={T}, vocab {V}, d_model {C}, {L} layers, {H} heads, d_ff {F}; {n:,} parameters; "
             f"Adam, no dropout, same initial weights and batches; first losses nbformer "
             f"{first_nb:.4f} / torch {first_torch:.4f}",
             "ratio per round: torch time / nbformer time of each interleaved round (rounds where other processes "
             "used the CPUs are re-run and left out), median [min..max]",
             "RSS growth: increase of the process's peak resident memory over each side's first step "
             "(includes allocator caches; torch's is measured after nbformer's, so it only shows what torch "
             "needed beyond that high-water mark)"]

    if not args.skip_attention:
        from nbformer.kernels.cpu.attention import attention_forward
        from nbformer.kernels.cpu.attention_backward import attention_backward

        Bh, NH, Ta, HS = 1, 12, 1024, 64
        Ca = NH * HS
        for causal in (False, True):
            qkv = rng.normal(size=(Bh, Ta, 3 * Ca)).astype(np.float32)
            mask = np.ones((Bh, Ta), np.uint8)
            out = np.empty((Bh, Ta, Ca), np.float32)
            lse = np.empty((Bh, NH, Ta), np.float32)
            attention_forward(out, lse, qkv, 0, qkv, Ca, 2 * Ca, mask, NH, HS, causal, HS ** -0.5)
            dout = rng.normal(size=out.shape).astype(np.float32)
            dqkv = np.empty_like(qkv)
            delta = np.empty_like(lse)

            def nb_bwd():
                attention_backward(dqkv, dqkv, delta, dout, out, lse, qkv, 0, qkv, Ca, 2 * Ca, mask, NH, HS, causal,
                                   HS ** -0.5)

            q, k, v = (torch.from_numpy(qkv[..., i * Ca:(i + 1) * Ca]).reshape(Bh, Ta, NH, HS).transpose(1, 2)
                       .contiguous().requires_grad_(True) for i in range(3))
            go = torch.from_numpy(dout).reshape(Bh, Ta, NH, HS).transpose(1, 2).contiguous()
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def torch_bwd():
                torch.autograd.grad(o, (q, k, v), go, retain_graph=True)

            r = timeit_pair({"nbformer": nb_bwd, "torch": torch_bwd}, warmup=1, repeat=max(5, args.repeat))
            fl = 2.5 * attention_flops(Bh, NH, Ta, Ta, HS, causal)  # backward ~ 2.5x the forward's FLOPs
            rows.append({"impl": f"attention backward {'causal' if causal else 'full'} T=1024: nbformer",
                         "median s": r["nbformer"]["median_s"], "tokens/s": f"{fl / r['nbformer']['median_s'] / 1e9:.1f} GFLOP/s"})
            rows.append({"impl": f"attention backward {'causal' if causal else 'full'} T=1024: torch SDPA",
                         "median s": r["torch"]["median_s"], "tokens/s": f"{fl / r['torch']['median_s'] / 1e9:.1f} GFLOP/s"})
            rows.append({"impl": "  ratio nbformer/torch (time)", "tokens/s": r["torch"]["median_s"] / r["nbformer"]["median_s"],
                         "ratio per round": spread(round_ratios(r))})
        notes.append("attention backward: B=1, 12 heads, T=1024, head 64; GFLOP/s counts 2.5x the forward's "
                     "4*B*H*T^2*HS (half for causal); nbformer recomputes P from the saved logsumexp (one pass per (batch, kv head) here; attention_backward.choose_passes)")
    print(write_results("train", "Training step and attention backward", ["impl", "median s", "tokens/s", "ratio per round", "peak MiB"],
                        rows, notes))


if __name__ == "__main__":
    main()
