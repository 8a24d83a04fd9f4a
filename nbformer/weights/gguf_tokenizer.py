"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` tokenizer.json, and the way back.

A GGUF file carries no tokenizer.json; llama.cpp keeps the vocabulary as metadata:
    tokenizer.ggml.model       'gpt2' (byte-level BPE: SmolLM2, GPT-2, Llama 3, Qwen) or
                               'llama' (sentencepiece-style BPE with byte fallback: Llama 2, Mistral)
    tokenizer.ggml.pre         how text is split before BPE ('smollm', 'gpt2', 'llama-bpe', ...)
    tokenizer.ggml.tokens / token_type / merges / scores
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, add_space_prefix
    tokenizer.chat_template    a Jinja template (nbformer.chat renders it)

tokenizer_json_from_gguf(metadata) -> tokenizer.json text:
  * 'gpt2': a BPE over the byte-level alphabet with the file's merges; the pre-tokenizer chosen by
    tokenizer.ggml.pre the way llama.cpp's llama-vocab.cpp does (digits one by one for the
    StarCoder / SmolLM family, the Llama 3 and Qwen 2 split expressions, GPT-2's otherwise); an
    unknown pre-tokenizer is an error naming it (llama.cpp refuses those too).
  * 'llama': a BPE with byte fallback, merges from the file or, as transformers and
    sentencepiece do, derived from the token scores; '▁' for spaces and a prefix space when
    add_space_prefix (default true).
  * tokens typed CONTROL (3) become special added tokens (matched whole, skipped when decoding
    with skip_special_tokens), USER_DEFINED (4) plain added tokens; BOS / EOS are added by the
    post-processor when add_bos_token / add_eos_token say so (llama default: BOS on).

write_tokenizer_metadata(writer, tokenizer_json_text, ...) adds those keys to a gguf.GGUFWriter
from a tokenizer.json (byte-level BPE -> 'gpt2', sentencepiece-style BPE with byte fallback ->
'llama' with scores llama.cpp can merge by; `nbformer quantize` uses it), so files nbformer writes
carry their tokenizer and round-trip through tokenizer_json_from_gguf.
"""
from __future__ import annotations

import json

from ..errors import ConfigError, WeightsError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (how, ignore_merges): 'gpt2' the GPT-2 byte-level split, 'digits' single
# digits first then GPT-2's (llama.cpp's STARCODER / SMOLLM group), else a Split regex
PRE_TOKENIZERS = {
    "default": ("gpt2", False), "gpt2": ("gpt2", False), "gpt-2": ("gpt2", False), "olmo": ("gpt2", False),
    "jais": ("gpt2", False), "phi-2": ("gpt2", False), "stablelm2": ("gpt2", False), "mpt": ("gpt2", False),
    "smollm": ("digits", False), "starcoder": ("digits", False), "refact": ("digits", False),
    "command-r": ("digits", False), "codeshell": ("digits", False), "exaone": ("digits", False),
    "minerva-7b": ("digits", False),
    "llama-bpe": (_LLAMA3_SPLIT, True), "llama3": (_LLAMA3_SPLIT, True), "llama-v3": (_LLAMA3_SPLIT, True),
    "smaug-bpe": (_LLAMA3_SPLIT, True), "dbrx": (_LLAMA3_SPLIT, True), "falcon3": (_LLAMA3_SPLIT, True),
    "qwen2": (_QWEN2_SPLIT, False), "deepseek-r1-qwen": (_QWEN2_SPLIT, False), "megrez": (_QWEN2_SPLIT, False),
}


def has_tokenizer(md: dict) -> bool:
    return isinstance(md.get("tokenizer.ggml.model"), str) and isinstance(md.get("tokenizer.ggml.tokens"), list)


def _flag(md, key, default):
    v = md.get(f"tokenizer.ggml.{key}")
    return bool(v) if isinstance(v, bool) else default


def _id(md, key, n):
    v = md.get(f"tokenizer.ggml.{key}")
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n else None


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_scores(tokens, scores) -> list:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two tokens of the
    vocabulary, best-scored merged token first (transformers' generate_merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    out = []
    for tok, score in zip(tokens, scores):
        local = [(tok[:k], tok[k:], score) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        out.extend(local)
    out.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [[a, b] for a, b, _ in out]


def _merges(md, where) -> list | None:
    m = md.get("tokenizer.ggml.merges")
    if m is None:
        return None
    if not isinstance(m, list):
        raise WeightsError(f"{where}: metadata 'tokenizer.ggml.merges' is not a list of strings")
    out = []
    for i, s in enumerate(m):
        parts = s.split(" ") if isinstance(s, str) else []
        if len(parts) != 2:
            raise WeightsError(f"{where}: tokenizer.ggml.merges[{i}] = {s!r}, expected two tokens separated by "
                               f"one space")
        out.append(parts)
    return out


def tokenizer_json_from_gguf(md: dict, where: str = "GGUF file") -> str:
    """tokenizer.json text for the tokenizer described by GGUF metadata `md` (see the module doc)."""
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise WeightsError(f"{where}: metadata 'tokenizer.ggml.tokens' is missing or not a list of strings")
    n = len(tokens)
    types = md.get("tokenizer.ggml.token_type")
    if types is None:
        types = [NORMAL] * n
    if not isinstance(types, list) or len(types) != n:
        raise WeightsError(f"{where}: 'tokenizer.ggml.token_type' has {len(types) if isinstance(types, list) else '?'} "
                           f"entries for {n} tokens")
    if len(set(tokens)) != n and kind == "gpt2":
        dup = next(t for i, t in enumerate(tokens) if t in tokens[:i])
        raise WeightsError(f"{where}: token {dup!r} appears twice in 'tokenizer.ggml.tokens'")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    bos, eos = _id(md, "bos_token_id", n), _id(md, "eos_token_id", n)
    unk = _id(md, "unknown_token_id", n)
    if kind == "gpt2":
        pre_name = md.get("tokenizer.ggml.pre") or "default"
        if pre_name not in PRE_TOKENIZERS:
            raise ConfigError(f"{where}: tokenizer.ggml.pre = {pre_name!r} is a pre-tokenizer nbformer does not "
                              f"know (known: {', '.join(sorted(PRE_TOKENIZERS))})")
        how, ignore_merges = PRE_TOKENIZERS[pre_name]
        merges = _merges(md, where)
        if merges is None:
            raise WeightsError(f"{where}: a 'gpt2' tokenizer without 'tokenizer.ggml.merges'")
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        if how == "gpt2":
            pre = byte_level
        elif how == "digits":
            pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": how}, "behavior": "Isolated", "invert": False},
                {**byte_level, "use_regex": False}]}
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
        normalizer = None
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        add_bos_default = False
    elif kind == "llama":
        scores = md.get("tokenizer.ggml.scores")
        merges = _merges(md, where)
        if merges is None:
            if not isinstance(scores, list) or len(scores) != n:
                raise WeightsError(f"{where}: a 'llama' tokenizer needs 'tokenizer.ggml.scores' ({n} numbers) "
                                   f"or 'tokenizer.ggml.merges'")
            merges = _merges_from_scores(tokens, scores)
        prefix = _flag(md, "add_space_prefix", True)
        model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges}
        steps = ([{"type": "Prepend", "prepend": "▁"}] if prefix else []) + [
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
        normalizer = {"type": "Sequence", "normalizers": steps}
        pre = None
        dec = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
        if prefix:
            dec.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder = {"type": "Sequence", "decoders": dec}
        add_bos_default = True
    else:
        raise ConfigError(f"{where}: tokenizer.ggml.model = {kind!r} is not supported (gpt2, llama)")
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, USER_DEFINED) or (kind == "llama" and ty == UNKNOWN):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": ty == USER_DEFINED and kind == "llama", "special": ty != USER_DEFINED})
    add_bos = _flag(md, "add_bos_token", add_bos_default) and bos is not None
    add_eos = _flag(md, "add_eos_token", False) and eos is not None
    if add_bos or add_eos:
        single = ([{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if add_bos else []) + \
                 [{"Sequence": {"id": "A", "type_id": 0}}] + \
                 ([{"SpecialToken": {"id": tokens[eos], "type_id": 0}}] if add_eos else [])
        pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
        specials = {}
        for tid in ([bos] if add_bos else []) + ([eos] if add_eos else []):
            specials[tokens[tid]] = {"id": tokens[tid], "ids": [tid], "tokens": [tokens[tid]]}
        post = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}
    elif kind == "gpt2":
        post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    else:
        post = None
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
           "pre_tokenizer": pre, "post_processor": post, "decoder": decoder, "model": model}
    return json.dumps(doc, ensure_ascii=False)


# ---------------------------------------------------------------- writing (nbformer quantize)
def _pre_name(pre) -> str:
    """tokenizer.ggml.pre for a tokenizer.json pre_tokenizer we can describe."""
    if not isinstance(pre, dict):
        return "default"
    if pre.get("type") == "ByteLevel":
        return "gpt2"
    if pre.get("type") == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
            return "smollm"
        if kinds == ["Split", "ByteLevel"]:
            rx = pre["pretokenizers"][0].get("pattern", {}).get("Regex")
            for name in ("llama-bpe", "qwen2"):
                if PRE_TOKENIZERS[name][0] == rx:
                    return name
    raise ConfigError(f"tokenizer.json: pre_tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent "
                      f"nbformer knows; cannot write it into a GGUF file")


def _prepends_space(doc) -> bool:
    """Whether a sentencepiece-style tokenizer.json puts '▁' in front of the text."""
    norm, pre = doc.get("normalizer") or {}, doc.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(x.get("type") == "Prepend" for x in steps if isinstance(x, dict)):
        return True
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(x.get("type") == "Metaspace" and x.get("prepend_scheme", "always") != "never"
               for x in pres if isinstance(x, dict))


def _template_adds(doc, token_id) -> bool:
    post = doc.get("post_processor") or {}
    posts = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for x in posts:
        if isinstance(x, dict) and x.get("type") == "TemplateProcessing":
            for piece in x.get("single", []):
                sp = piece.get("SpecialToken") if isinstance(piece, dict) else None
                if sp and token_id in (x.get("special_tokens", {}).get(sp.get("id"), {}).get("ids") or []):
                    return True
    return False


def write_tokenizer_metadata(writer, tokenizer_json_text: str, bos_token_id=None, eos_token_id=None,
                             pad_token_id=None, add_bos_token: bool | None = None, chat_template: str | None = None):
    """Add tokenizer.ggml.* (and tokenizer.chat_template) to a gguf.GGUFWriter from tokenizer.json
    text. A byte-level BPE (GPT-2 / SmolLM2 / Llama 3 / Qwen style) becomes tokenizer.ggml.model
    'gpt2' with its pre-tokenizer's llama.cpp name; a sentencepiece-style BPE with byte fallback
    (Llama 2 / Mistral / TinyLlama) becomes 'llama', with scores = -(rank of the merge that makes the
    token) so llama.cpp's score-ordered merging follows the merge list, <0xXX> tokens typed BYTE
    and add_space_prefix from its normalizer. Token ids are kept; added tokens marked special
    become CONTROL, other added tokens USER_DEFINED. add_bos_token None: what the tokenizer's
    post-processor does. Returns the number of tokens written."""
    try:
        doc = json.loads(tokenizer_json_text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"tokenizer.json: not valid JSON ({e.msg})") from None
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer.json: model {model.get('type')!r} cannot be written to GGUF yet "
                          f"(byte-level BPE and sentencepiece-style BPE with byte fallback can)")
    spm = bool(model.get("byte_fallback"))
    pre = None if spm else _pre_name(doc.get("pre_tokenizer"))
    vocab = dict(model.get("vocab") or {})
    specials = {}
    for a in doc.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        specials[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    for i, t in enumerate(tokens):
        if t is None:  # a hole in the ids: llama.cpp wants one token per id
            tokens[i] = f"[PAD{i}]"
            specials[i] = UNUSED
    pairs = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    merges = [" ".join(m) for m in pairs]
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if spm:
        rank = {}
        for r, (a, b) in enumerate(pairs):
            rank.setdefault(a + b, r)
        unk = model.get("unk_token")
        types, scores = [], []
        for i, t in enumerate(tokens):
            if i in specials:
                types.append(specials[i] if t != unk else UNKNOWN)
            elif t == unk:
                types.append(UNKNOWN)
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types.append(BYTE)
            else:
                types.append(NORMAL)
            scores.append(-float(rank[t]) if t in rank else 0.0)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_token_merges(merges)  # llama.cpp merges by the scores; nbformer's reader uses these
        writer.add_add_space_prefix(_prepends_space(doc))
        if unk in vocab:
            writer.add_unk_token_id(int(vocab[unk]))
    else:
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([specials.get(i, NORMAL) for i in range(n)])
        writer.add_token_merges(merges)
    for fn, v in (("add_bos_token_id", bos_token_id), ("add_eos_token_id", eos_token_id),
                  ("add_pad_token_id", pad_token_id)):
        if v is not None:
            getattr(writer, fn)(int(v))
    if add_bos_token is None and bos_token_id is not None:
        add_bos_token = _template_adds(doc, int(bos_token_id))
    if add_bos_token is not None:
        writer.add_add_bos_token(bool(add_bos_token))
    if chat_template:
        writer.add_chat_template(chat_template)
    return n
