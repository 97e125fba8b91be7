"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import pytest

from kiln.runtime.server.chat_template import ChatTemplate, ChatTemplateError, special_tokens
from kiln.runtime.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}{% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""
TOJSON = (
    "{% for m in messages %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[{{ eos_token }}]{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " héllo  "},
     {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Again ✓"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama / "tokenizer")


@pytest.mark.parametrize("template", [None, CHATML, LLAMA2, TOJSON], ids=["artifact", "chatml", "llama2", "tojson"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "four"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers(llama, hf_tokenizer, template, messages, add_generation_prompt):
    tok = Tokenizer(llama)
    source = template or tok.chat_template
    ours = ChatTemplate(source, tok.config).render(messages, add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_template_errors(llama):
    tok = Tokenizer(llama)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ChatTemplate(LLAMA2, tok.config).render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="failed"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", tok.config).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute games
        ChatTemplate("{{ ''.__class__.__mro__ }}", tok.config).render([])


def test_named_templates_and_added_token_dicts():
    config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "model_max_length": 8}
    assert special_tokens(config) == {"bos_token": "<s>", "eos_token": "</s>"}
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]
    assert ChatTemplate(named, config).render([]) == "<s>D"
