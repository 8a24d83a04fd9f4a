"""Whole-model benchmarks on the GPU: nbformer (device="cuda") side by side with torch CUDA, one run.

fp32 on both sides (TF32 off in torch: matmul and cuDNN; float32 matmul precision "highest"). Each
case times the two sides interleaved (nb, torch, then torch, nb, ...) over --rounds rounds after
warm-up calls (the first nbformer call, which compiles the CUDA kernels, is timed and reported on its
own), and reports the median, interquartile range and min-max of each side and of the per-round
ratio nbformer / torch (> 1: nbformer faster).

  decode   GPT-2 124M (transformers.GPT2Config() defaults, random init, save_pretrained), B=1,
           prompt 16 tokens + 128 new, greedy: nbformer m.generate(ids, max_new_tokens=128,
           min_new_tokens=128) vs HF generate(do_sample=False, max_new_tokens=128,
           min_new_tokens=128); tokens/s and the fraction of identical new tokens (+ the length of
           the identical prefix).
  prefill  GPT-2 124M forward B=8, T=1024, logits of every position: m.forward(ids) (logits
           downloaded to a host array) vs HF forward + logits.cpu(); and the same on the device
           (nbformer's executor with on_device=True vs HF logits left on the GPU); ms and ratio,
           max |logits difference|.
  embed    MiniLM-shaped sentence embeddings (BertModel with all-MiniLM-L6-v2's config, random
           init, a sentence-transformers folder: mean pooling + Normalize, max_seq_length 256, a
           WordPiece tokenizer.json trained here with `tokenizers`): 10,000 generated sentences of
           varied length (a few beyond 256 tokens), batch 64: nbformer.Embedder(dir, device) vs
           SentenceTransformer(dir, device); sentences/s, ratio, max |embedding difference|.
  ttft     time to the first GPT-2 token from process start: a subprocess `python -m cli.main
           generate hello --model DIR -n 1 --json` (with --device when the CLI has it, and
           NBFORMER_DEVICE set either way; a `python -c` script when the CLI fails), timed from
           spawn, first with an empty Numba cache (NUMBA_CACHE_DIR = a fresh temp dir: every kernel
           compiles) and then warm (the same dir again).

    PYTHONPATH=. python3 benchmarks/gpu/bench_models.py --json results.json --md results.md   # on a GPU
    PYTHONPATH=. python benchmarks/gpu/bench_models.py --smoke --device cpu   # tiny models, logic only

--smoke: tiny models and counts (torch on the CPU when nbformer's device is the CPU or the CUDA
simulator). --only decode,prefill,embed,ttft picks cases. --budget S: skip the cases that no longer
fit in S seconds from start (benchmarks/gpu/check.sh passes what is left of its budget). The JSON
(--json) and the markdown (--md, appended) are written after every case, so a run cut short still
leaves what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
T_START = time.perf_counter()
CASES = ("decode", "prefill", "embed", "ttft")
# rough wall time a case needs on an H200 (kernels already compiled by earlier steps, or not):
# a case is skipped when less than this is left of --budget
NEEDS_S = {"decode": 45, "prefill": 35, "embed": 60, "ttft": 40}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models and counts (try the logic on a CPU)")
    p.add_argument("--device", default="cuda", help="nbformer device: cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--only", default=None, help=f"comma-separated cases out of {','.join(CASES)}")
    p.add_argument("--json", dest="json_path", default=None, help="write all results as JSON here")
    p.add_argument("--md", dest="md_path", default=None, help="append the markdown tables to this file")
    p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds per case (>= 5 for results)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side after the first one")
    p.add_argument("--budget", type=float, default=0.0, help="seconds; skip cases that no longer fit (0: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch / Numba (default: 2 with --device cpu, else untouched)")
    p.add_argument("--embed-n", type=int, default=None, help="sentences for embed (default 10,000; smoke 96)")
    p.add_argument("--embed-batch", type=int, default=64)
    p.add_argument("--ttft-timeout", type=float, default=180.0, help="seconds for the cold-cache subprocess")
    p.add_argument("--ttft-warm", type=int, default=3, help="warm-cache subprocess runs")
    a = p.parse_args(argv)
    only = CASES if a.only is None else tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = [x for x in only if x not in CASES]
    if bad:
        p.error(f"--only: unknown case(s) {bad}; expected some of {list(CASES)}")
    a.cases = only
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    return a


# ---------------------------------------------------------------- statistics
def _q(xs, f):
    """Quantile f of xs (linear interpolation, like numpy's default)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * f
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(xs) -> dict:
    return {"median": statistics.median(xs), "q1": _q(xs, 0.25), "q3": _q(xs, 0.75),
            "min": min(xs), "max": max(xs), "n": len(xs), "values": [round(x, 6) for x in xs]}


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 0.01:
            return f"{v:.{digits}g}"
        return f"{v:.2e}"
    return str(v)


def spread(st, scale=1.0) -> str:
    """'median (IQR q1-q3, min-max lo-hi)' of a stats dict, times scale."""
    return (f"{fmt(st['median'] * scale)} (IQR {fmt(st['q1'] * scale)}-{fmt(st['q3'] * scale)}, "
            f"range {fmt(st['min'] * scale)}-{fmt(st['max'] * scale)})")


def md_table(columns, rows) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


class Bench:
    """Shared state: devices, the sync functions, results (JSON) and markdown sections."""

    def __init__(self, args, torch, np):
        self.args, self.torch, self.np = args, torch, np
        self.nb_device = args.device
        self.simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        self.tiny = bool(args.smoke and self.simulated and args.device.startswith("cuda"))
        cuda_nb = args.device.startswith("cuda")
        self.torch_device = "cuda" if (cuda_nb and torch.cuda.is_available()) else "cpu"
        self.results = {"args": {k: v for k, v in vars(args).items()}, "cases": {}, "skipped": {},
                        "errors": {}}
        self.md_sections = []
        self.tmp = Path(tempfile.mkdtemp(prefix="nbformer-gpu-bench-"))

    # timing ---------------------------------------------------------------
    def sync(self):
        if self.torch_device == "cuda":
            self.torch.cuda.synchronize()
        if self.nb_device.startswith("cuda"):
            from nbformer.devices import get_device

            get_device(self.nb_device).synchronize()

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        r = fn()
        self.sync()
        return time.perf_counter() - t0, r

    def interleaved(self, fns: dict, rounds: int) -> dict:
        """fns: name -> callable. Warm-up calls, then `rounds` rounds of every fn once, the order
        reversed every other round. -> name -> list of seconds."""
        for fn in fns.values():
            for _ in range(self.args.warmup):
                self.timed(fn)
        times = {k: [] for k in fns}
        names = list(fns)
        for r in range(rounds):
            for k in (names if r % 2 == 0 else names[::-1]):
                times[k].append(self.timed(fns[k])[0])
        return times

    def ratio_stats(self, times, nb, ref):
        """Per-round throughput ratio nbformer / reference = t_ref / t_nb."""
        return stats([t_ref / t_nb for t_nb, t_ref in zip(times[nb], times[ref])])

    # output ---------------------------------------------------------------
    def section(self, name, md: str, data: dict):
        self.results["cases"][name] = data
        self.md_sections.append(md)
        print(md + "\n", flush=True)
        self.flush(md)

    def flush(self, md=None):
        if self.args.json_path:
            p = Path(self.args.json_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self.results["elapsed_s"] = round(time.perf_counter() - T_START, 2)
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
            tmp.replace(p)
        if self.args.md_path and md:
            with open(self.args.md_path, "a", encoding="utf-8") as f:
                f.write(md + "\n\n")

    def free(self):
        gc.collect()
        if self.torch_device == "cuda":
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------- models on disk
def gpt2_config(bench):
    from transformers import GPT2Config

    if bench.tiny:  # the CUDA simulator runs one Python thread per CUDA thread: smaller still
        return GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=320,
                          bos_token_id=319, eos_token_id=319)
    if bench.args.smoke:
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=1000,
                          bos_token_id=999, eos_token_id=999)
    return GPT2Config()  # 124M: 12 layers, 768 wide, 12 heads, 1024 positions, vocab 50257


def make_gpt2(bench):
    """Random-init GPT2LMHeadModel saved to a temp dir (+ a small byte-level BPE tokenizer.json so
    text prompts work for the CLI). Returns (dir, the HF model on the CPU)."""
    torch = bench.torch
    d = bench.tmp / "gpt2"
    if (d / "model.safetensors").exists():
        return d, None
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = gpt2_config(bench)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    trainer = trainers.BpeTrainer(vocab_size=min(900, cfg.vocab_size - 1), special_tokens=[],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(2000, seed=7), trainer)
    tok.add_special_tokens([eos])  # id = the current vocab size (< the model's): harmless for timing
    tok.save(str(d / "tokenizer.json"))
    return d, model


_SYL = ["ka", "lo", "mi", "ren", "tas", "vo", "ul", "bri", "sen", "dor", "qua", "phi", "nex", "tor",
        "al", "ve", "ing", "ed", "ly", "ment", "tion", "er", "ist", "ous"]
_WORDS = ("the a of and to in is was that for on with as by at from this it an be are or which "
          "river model city night music data light engine garden window letter market station "
          "quickly slowly never always often carefully suddenly under over between after before "
          "small large ancient modern quiet bright broken golden hidden simple complex").split()


def sentences(n, seed=0, long_share=0.05, short=False):
    """n deterministic sentences of varied length: most 4-30 words, some 30-90, a few 150-300
    (longer than 256 tokens: truncated); words from a fixed list and made-up syllable words.
    short=True: 3-10 words (for the CUDA simulator)."""
    rng = random.Random(seed)
    made = ["".join(rng.choice(_SYL) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    out = []
    for _ in range(n):
        u = rng.random()
        k = (rng.randint(3, 10) if short else rng.randint(150, 300) if u < long_share
             else rng.randint(30, 90) if u < 0.3 else rng.randint(4, 30))
        ws = [rng.choice(_WORDS) if rng.random() < 0.6 else rng.choice(made) for _ in range(k)]
        if rng.random() < 0.3:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 99999)))
        s = " ".join(ws)
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ",", ";"]))
    return out


def make_minilm(bench, sent):
    """A sentence-transformers folder shaped like all-MiniLM-L6-v2: BertModel (random init) at the
    root, a WordPiece tokenizer.json trained on `sent`, modules.json (Transformer, Pooling mean,
    Normalize), sentence_bert_config.json (max_seq_length 256), 1_Pooling/config.json."""
    torch = bench.torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    smoke = bench.args.smoke
    d = bench.tmp / "minilm"
    if smoke:
        cfg = BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=1 if bench.tiny else 2,
                         num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=512)
    else:
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512, hidden_act="gelu",
                         layer_norm_eps=1e-12, type_vocab_size=2, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d, safe_serialization=True)

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, special_tokens=specials,
                                        show_progress=False)
    tok.train_from_iterator(sent, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(d / "tokenizer.json"))
    vocab = tok.get_vocab()
    (d / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
                                 encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "tokenize_chinese_chars": True,
        "strip_accents": None, "model_max_length": 512}))
    (d / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
        indent=2))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": cfg.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (d / "2_Normalize").mkdir(exist_ok=True)
    return d, cfg, len(vocab)


# ---------------------------------------------------------------- cases
def case_decode(b: Bench):
    torch, np = b.torch, b.np
    import nbformer

    P, N = (8, 4) if b.tiny else (16, 16) if b.args.smoke else (16, 128)
    path, hf = make_gpt2(b)
    t0 = time.perf_counter()
    nb = nbformer.load(path, device=b.nb_device)
    load_s = time.perf_counter() - t0
    if hf is None:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(path).eval()
    hf = hf.to(b.torch_device)
    V = nb.config.vocab_size
    eos = nb.config.eos_token_id
    ids = np.random.default_rng(0).integers(0, V, size=(1, P), dtype=np.int64)
    ids_t = torch.from_numpy(ids).to(b.torch_device)
    mask_t = torch.ones_like(ids_t)

    def run_nb():
        return nb.generate(ids, max_new_tokens=N, min_new_tokens=N)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids_t, attention_mask=mask_t, do_sample=False, max_new_tokens=N,
                               min_new_tokens=N, pad_token_id=eos)

    first_s, a = b.timed(run_nb)  # compiles the CUDA kernels on first use
    hf_first_s, ref = b.timed(run_hf)
    a, ref = np.asarray(a), ref.cpu().numpy()
    na, nr = a[0, P:], ref[0, P:]
    n = min(len(na), len(nr))
    same = float((na[:n] == nr[:n]).mean()) if n else 0.0
    prefix = int(np.argmax(na[:n] != nr[:n])) if n and (na[:n] != nr[:n]).any() else n
    times = b.interleaved({"nbformer": run_nb, "torch": run_hf}, b.args.rounds)
    st = {k: stats([len(na) / t for t in v]) for k, v in times.items()}
    rs = b.ratio_stats(times, "nbformer", "torch")
    name = "GPT-2 124M" if not b.args.smoke else "GPT-2 tiny (smoke)"
    rows = [{"impl": f"nbformer generate ({b.nb_device})", "tokens/s": spread(st["nbformer"]),
             "first call s": fmt(first_s)},
            {"impl": f"transformers generate (torch {b.torch_device})", "tokens/s": spread(st["torch"]),
             "first call s": fmt(hf_first_s)},
            {"impl": "**ratio nbformer / torch**", "tokens/s": spread(rs)}]
    md = "\n".join([f"### Decode: {name}, B=1, prompt {P} + {N} new, greedy", "",
                    md_table(["impl", "tokens/s", "first call s"], rows), "",
                    f"- new tokens identical to transformers: {same:.1%} of {n} (identical prefix: {prefix} "
                    f"tokens; nbformer made {len(na)}, transformers {len(nr)}); min_new_tokens={N} on both "
                    f"sides so EOS never ends a row early",
                    f"- nbformer load {load_s:.2f} s; first generate (Numba compiles the kernels) "
                    f"{first_s:.2f} s; {b.args.rounds} interleaved rounds after {b.args.warmup} warm-up call(s)"])
    b.section("decode", md, {"prompt": P, "new": N, "tokens_per_s": st, "ratio": rs, "times_s": times,
                             "same_fraction": same, "same_prefix": prefix, "nb_tokens": len(na),
                             "hf_tokens": len(nr), "first_call_s": first_s, "hf_first_call_s": hf_first_s,
                             "load_s": load_s, "target_ratio": 2.0})
    del nb, hf
    b.free()


def case_prefill(b: Bench):
    torch, np = b.torch, b.np
    import nbformer

    B, T = (1, 16) if b.tiny else (2, 64) if b.args.smoke else (8, 1024)
    path, hf = make_gpt2(b)
    nb = nbformer.load(path, device=b.nb_device)
    if hf is None:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(path).eval()
    hf = hf.to(b.torch_device)
    ids = np.random.default_rng(1).integers(0, nb.config.vocab_size, size=(B, T), dtype=np.int64)
    ids_t = torch.from_numpy(ids).to(b.torch_device)
    cfg = nb.config
    try:  # the executor m.forward uses (same key), run with the logits left on the device
        from nbformer.graph.build import build_forward

        inputs = nb.prepare_inputs(ids)
        ex = nb.executor(("forward", B, T), lambda: build_forward(cfg, B, T, "all"))
        out_name = ex.graph.outputs[0]
        dev_note = ""
    except Exception as e:  # internals moved: time the host path only
        ex = inputs = None
        dev_note = f"; on-device rows skipped ({type(e).__name__}: {str(e)[:200]})"

    def nb_host():
        return nb.forward(ids)

    def hf_host():
        with torch.inference_mode():
            return hf(ids_t).logits.cpu()

    def nb_dev():
        return ex.run(inputs, on_device=True)[out_name]

    def hf_dev():
        with torch.inference_mode():
            return hf(ids_t).logits

    first_s, got = b.timed(nb_host)
    want = hf_host().numpy()
    max_diff = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    del got, want
    fns = {"nb_host": nb_host, "hf_host": hf_host}
    if ex is not None:
        fns.update(nb_dev=nb_dev, hf_dev=hf_dev)
    times = b.interleaved(fns, b.args.rounds)
    ms = {k: stats([1e3 * t for t in v]) for k, v in times.items()}
    r_host = b.ratio_stats(times, "nb_host", "hf_host")
    r_dev = b.ratio_stats(times, "nb_dev", "hf_dev") if ex is not None else None
    gb = B * T * cfg.vocab_size * 4 / 1e9
    rows = [{"impl": f"nbformer m.forward(ids) -> host ({b.nb_device})", "ms": spread(ms["nb_host"])},
            {"impl": f"transformers forward + logits.cpu() (torch {b.torch_device})", "ms": spread(ms["hf_host"])},
            {"impl": "**ratio nbformer / torch, logits to host**", "ratio (speed)": spread(r_host)}]
    if ex is not None:
        rows += [{"impl": "nbformer executor, logits left on the device", "ms": spread(ms["nb_dev"])},
                 {"impl": "transformers forward, logits left on the device", "ms": spread(ms["hf_dev"])},
                 {"impl": "**ratio nbformer / torch, on the device**", "ratio (speed)": spread(r_dev)}]
    name = "GPT-2 124M" if not b.args.smoke else "GPT-2 tiny (smoke)"
    md = "\n".join([f"### Prefill: {name} forward, B={B} T={T}, logits of every position", "",
                    md_table(["impl", "ms", "ratio (speed)"], rows), "",
                    f"- max |logits difference| {max_diff:.2e} (max |logit| {scale:.2f}); logits are "
                    f"{gb:.2f} GB, so the host rows include that download on both sides",
                    f"- transformers attention: {getattr(hf.config, '_attn_implementation', '?')}; first "
                    f"nbformer forward {first_s:.2f} s{dev_note}"])
    b.section("prefill", md, {"B": B, "T": T, "ms": ms, "ratio_host": r_host, "ratio_device": r_dev,
                              "max_abs_diff": max_diff, "max_abs_logit": scale, "first_call_s": first_s,
                              "attn_implementation": getattr(hf.config, "_attn_implementation", None),
                              "target_ratio_first_aim": 0.5})
    del nb, hf, ex, inputs
    b.free()


def case_embed(b: Bench):
    np = b.np
    import nbformer
    from sentence_transformers import SentenceTransformer

    n = b.args.embed_n or (16 if b.tiny else 96 if b.args.smoke else 10_000)
    bs = 8 if b.tiny else b.args.embed_batch
    sent = sentences(n, seed=1, short=b.tiny)
    t0 = time.perf_counter()
    path, cfg, vocab_n = make_minilm(b, sent)
    make_s = time.perf_counter() - t0
    nb = nbformer.Embedder(str(path), device=b.nb_device, batch_size=bs)
    st = SentenceTransformer(str(path), device=b.torch_device)
    lengths = [len(ids) for ids, _ in nb.tokenizer.encode_batch(sent)]

    def run_nb():
        return nb.encode(sent, batch_size=bs)

    def run_st():
        return st.encode(sent, batch_size=bs, convert_to_numpy=True, show_progress_bar=False)

    first_s, got = b.timed(run_nb)
    want = run_st()
    max_diff = float(np.max(np.abs(got - want)))
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    times = b.interleaved({"nbformer": run_nb, "sentence-transformers": run_st}, b.args.rounds)
    sps = {k: stats([n / t for t in v]) for k, v in times.items()}
    rs = b.ratio_stats(times, "nbformer", "sentence-transformers")
    by_len = sorted(lengths, reverse=True)  # the Embedder batches sentences of similar length
    shapes = len({(len(by_len[i:i + bs]), by_len[i]) for i in range(0, n, bs)})
    rows = [{"impl": f"nbformer Embedder ({b.nb_device})", "sentences/s": spread(sps["nbformer"]),
             "first call s": fmt(first_s)},
            {"impl": f"sentence-transformers (torch {b.torch_device})",
             "sentences/s": spread(sps["sentence-transformers"])},
            {"impl": "**ratio nbformer / torch**", "sentences/s": spread(rs)}]
    name = "MiniLM-L6 shape (384 wide, 6 layers, 12 heads)" if not b.args.smoke else "tiny BERT (smoke)"
    md = "\n".join([f"### Embeddings: {name}, {n:,} sentences, batch {bs}, mean pooling + Normalize", "",
                    md_table(["impl", "sentences/s", "first call s"], rows), "",
                    f"- max |embedding difference| {max_diff:.2e}, min cosine {float(cos.min()):.7f}",
                    f"- tokens per sentence: median {statistics.median(lengths):.0f}, max {max(lengths)} "
                    f"(truncation at 256), {sum(lengths):,} in all; about {shapes} distinct (batch, length) "
                    f"shapes per pass; WordPiece vocabulary trained here: {vocab_n:,} tokens "
                    f"(model vocabulary {cfg.vocab_size:,}); folder made in {make_s:.1f} s"])
    b.section("embed", md, {"n": n, "batch": bs, "sentences_per_s": sps, "ratio": rs, "times_s": times,
                            "max_abs_diff": max_diff, "min_cosine": float(cos.min()),
                            "tokens": {"median": statistics.median(lengths), "max": max(lengths),
                                       "total": sum(lengths)},
                            "distinct_shapes": shapes, "first_call_s": first_s, "target_ratio_first_aim": 0.5})
    del nb, st
    b.free()


_TTFT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import nbformer
m = nbformer.load(sys.argv[1], device=sys.argv[2])
r = m.generate("hello", max_new_tokens=1, return_dict=True)
print(json.dumps({"time_to_first_token_s": r.time_to_first_token, "in_process_s": time.perf_counter() - t0}))
"""


def _cli_has_device() -> bool:
    try:
        p = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=60, env=_child_env({}))
        return "--device" in p.stdout
    except (OSError, subprocess.SubprocessError):
        return False


def _child_env(extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _spawn(cmd, env, timeout):
    """Run cmd from REPO; -> (seconds to the first stdout line, seconds to exit, last stdout line, stderr)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()  # blocks until the first line (the only one with --json)
        t_first = time.perf_counter() - t0
        rest, err = p.communicate(timeout=max(1.0, timeout - t_first))
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise TimeoutError(f"no result within {timeout:.0f} s") from None
    t_exit = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:8]))} ... failed ({p.returncode}): {err.strip()[-1500:]}")
    lines = [x for x in (first + rest).splitlines() if x.strip()]
    return t_first, t_exit, (lines[-1] if lines else ""), err


def case_ttft(b: Bench, remaining):
    path, _ = make_gpt2(b)
    has_device = _cli_has_device()
    cli = [sys.executable, "-m", "cli.main", "generate", "hello", "--model", str(path), "-n", "1", "--json"]
    if has_device:
        cli += ["--device", b.nb_device]
    script = [sys.executable, "-c", _TTFT_SCRIPT, str(path), b.nb_device]
    cache = b.tmp / "numba-cache-ttft"
    cache.mkdir()
    env = _child_env({"NUMBA_CACHE_DIR": str(cache), "NBFORMER_DEVICE": b.nb_device})
    cold_timeout = min(b.args.ttft_timeout, remaining()) if b.args.budget else b.args.ttft_timeout
    used, how, note = cli, "CLI", ""
    try:
        cold = _spawn(cli, env, cold_timeout)
    except TimeoutError as e:  # a cold start longer than what is left: say so, and stop here
        msg = f"cold-cache run ({' '.join(cli[1:5])} ...): {e}; warm runs not attempted"
        b.section("ttft", f"### Time to the first GPT-2 token from process start ({b.nb_device})\n\n- {msg}",
                  {"cold_timeout_s": cold_timeout, "note": msg})
        return
    except RuntimeError as e:  # the CLI failed (e.g. an option it does not have yet): the script instead
        note = f"the CLI failed ({str(e)[:300]}); timed the python -c script instead"
        shutil.rmtree(cache)
        cache.mkdir()
        used, how = script, "python -c"
        cold = _spawn(script, env, cold_timeout)
    nbi = len(list(cache.rglob("*.nbi")))
    warm = []
    for _ in range(b.args.ttft_warm):
        if b.args.budget and remaining() < 15:
            break
        warm.append(_spawn(used, env, 120.0))

    def inproc(res):
        try:
            return json.loads(res[2]).get("time_to_first_token_s")
        except (ValueError, AttributeError):
            return None

    wst = stats([w[0] for w in warm]) if warm else None
    rows = [{"run": "cold Numba cache (every kernel compiles)", "spawn -> first token s": fmt(cold[0]),
             "process exit s": fmt(cold[1]), "in-process TTFT s": fmt(inproc(cold))}]
    if wst:
        rows.append({"run": f"warm Numba cache, median of {len(warm)}", "spawn -> first token s": spread(wst),
                     "process exit s": fmt(statistics.median(w[1] for w in warm)),
                     "in-process TTFT s": fmt(inproc(warm[len(warm) // 2]))})
    cmd_txt = " ".join(["python3"] + [str(c) if " " not in str(c) else repr(c) for c in used[1:]])
    if how == "python -c":
        cmd_txt = "python3 -c '<load + generate(\"hello\", max_new_tokens=1)>' DIR " + b.nb_device
    md = "\n".join([f"### Time to the first GPT-2 token from process start ({b.nb_device})", "",
                    md_table(["run", "spawn -> first token s", "process exit s", "in-process TTFT s"], rows), "",
                    f"- {how}: `{cmd_txt.replace(str(path), 'DIR')}` with NBFORMER_DEVICE={b.nb_device} and "
                    f"NUMBA_CACHE_DIR=<fresh temp dir> (then the same dir again); the CLI "
                    f"{'has' if has_device else 'has no'} --device; {nbi} Numba index files (*.nbi) in the "
                    f"cache after the cold run" + (f"; {note}" if note else ""),
                    "- 'spawn -> first token': until the one --json line arrives on stdout (generate -n 1 "
                    "prints when its first token is done); in-process TTFT: what generate itself reports"])
    b.section("ttft", md, {"how": how, "cli_has_device": has_device, "cold": {"first_s": cold[0], "exit_s": cold[1],
                                                                              "ttft_in_process_s": inproc(cold)},
                           "warm": [{"first_s": w[0], "exit_s": w[1], "ttft_in_process_s": inproc(w)} for w in warm],
                           "warm_first_s": wst, "cache_index_files": nbi, "note": note})


# ---------------------------------------------------------------- main
def versions(torch) -> dict:
    from importlib import metadata

    v = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "numba", "numba-cuda", "llvmlite", "torch", "transformers", "sentence-transformers",
                "tokenizers", "safetensors"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    v["torch_cuda"] = getattr(torch.version, "cuda", None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v["gpu"] = p.name
        v["compute_capability"] = f"{p.major}.{p.minor}"
        v["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
    try:
        v["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        v["git"] = None
    return v


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (2 if args.device == "cpu" else None)
    if threads:
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[k] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network; all models are local
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch  # before Numba starts its OpenMP layer (the two share libgomp; see benchmarks/common.py)

    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    import numpy as np

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    sys.path.insert(0, str(REPO))
    b = Bench(args, torch, np)
    v = versions(torch)
    b.results["versions"] = v
    b.results["torch_device"] = b.torch_device
    head = (f"## Whole models: nbformer ({args.device}{', CUDA simulator' if b.simulated else ''}) vs torch "
            f"({b.torch_device}), fp32, TF32 off{' -- SMOKE (tiny models)' if args.smoke else ''}\n\n"
            f"{v.get('gpu', 'no CUDA GPU visible to torch')}"
            f"{' (cc ' + v['compute_capability'] + ')' if v.get('compute_capability') else ''}; python "
            f"{v['python']}, numba {v['numba']}, numba-cuda {v['numba-cuda']}, torch {v['torch']} (CUDA "
            f"{v['torch_cuda']}), transformers {v['transformers']}, sentence-transformers "
            f"{v['sentence-transformers']}; git {v['git']}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Cells: median "
            f"(IQR, range) over {args.rounds} interleaved rounds; ratios are nbformer / torch per round "
            f"(> 1: nbformer faster).")
    print(head + "\n", flush=True)
    b.flush(head)

    def remaining():
        return args.budget - (time.perf_counter() - T_START) if args.budget else float("inf")

    rc = 0
    try:
        for name in args.cases:
            if remaining() < NEEDS_S[name]:
                msg = f"skipped: {remaining():.0f} s left of --budget {args.budget:.0f}, the case needs ~{NEEDS_S[name]} s"
                b.results["skipped"][name] = msg
                b.section(f"skipped:{name}", f"### {name}: {msg}", {"skipped": msg})
                continue
            t0 = time.perf_counter()
            try:
                if name == "ttft":
                    case_ttft(b, remaining)
                else:
                    {"decode": case_decode, "prefill": case_prefill, "embed": case_embed}[name](b)
                b.results["cases"][name]["wall_s"] = round(time.perf_counter() - t0, 2)
                b.flush()
            except Exception as e:  # report, and go on with the next case
                rc = 1
                tb = traceback.format_exc()
                print(tb, file=sys.stderr, flush=True)
                b.results["errors"][name] = tb[-4000:]
                b.section(f"error:{name}", f"### {name}: FAILED after {time.perf_counter() - t0:.1f} s\n\n"
                                           f"```\n{type(e).__name__}: {str(e)[:1500]}\n```", {"error": tb[-4000:]})
                b.free()
    finally:
        b.flush()
        shutil.rmtree(b.tmp, ignore_errors=True)
    print(f"bench_models: {time.perf_counter() - T_START:.1f} s in all", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
