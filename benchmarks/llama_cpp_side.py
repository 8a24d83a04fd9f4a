"""llama.cpp through llama-cpp-python, as the side-by-side oracle of bench_quant.py (optional).

Not a dependency of nbformer: `pip install --no-deps llama-cpp-python diskcache` (it builds
llama.cpp from source, ~15 min on 2 cores). Every function takes token ids, so both runtimes see
exactly the same prompt; the ids come from nbformer's GGUF tokenizer (the tests check it gives
llama.cpp's ids).
"""
from __future__ import annotations

import time


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def load(path: str, threads: int, n_ctx: int = 512):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, n_ubatch=512, verbose=False)


def greedy(llm, ids, n_new: int) -> list:
    """n_new greedy tokens after the prompt ids (llama.cpp's sampler at top_k=1, no penalties)."""
    out = []
    for tok in llm.generate(list(map(int, ids)), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            reset=True):
        out.append(int(tok))
        if len(out) == n_new:
            break
    return out


def decode_seconds(llm, ids, n_new: int) -> float:
    """Seconds for n_new single-token greedy steps after the prompt (the prompt's own eval and the
    first token it gives are not counted), as bench_quant.decode_steps times nbformer."""
    gen = llm.generate(list(map(int, ids)), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
    next(gen)  # prompt processed, first token sampled
    t0 = time.perf_counter()
    for i, _ in enumerate(gen):
        if i + 1 == n_new:
            break
    return time.perf_counter() - t0


def prefill_seconds(llm, ids) -> float:
    """Seconds for one batched eval of the prompt ids into an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(map(int, ids)))
    return time.perf_counter() - t0
