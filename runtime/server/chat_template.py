"""Chat templates rendered as transformers renders them, without importing transformers.

The template is the artifact tokenizer's Jinja string. As `PreTrainedTokenizer.apply_chat_template`
does: a sandboxed, immutable Jinja environment with trim_blocks/lstrip_blocks and loop controls,
`tojson` that keeps non-ASCII, `raise_exception` and `strftime_now` globals, and the variables
`messages`, `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...).
The rendered text already holds the special tokens it needs, so it is encoded without adding
more.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception) or failed on it."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """bos_token, eos_token, ... as strings (a config may store AddedToken dicts)."""
    out: dict[str, Any] = {}
    for key, value in tokenizer_config.items():
        if key.endswith("_token"):
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return out


def _pick(template: str | list | None) -> str | None:
    # A tokenizer config may hold named templates: [{"name": "default", "template": "..."}, ...]
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text."""

    def __init__(self, template: str | list, tokenizer_config: dict[str, Any]):
        source = _pick(template)
        if not isinstance(source, str):
            raise ValueError("the tokenizer's chat_template has no 'default' template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._special = special_tokens(tokenizer_config)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text; ChatTemplateError when the template rejects it."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
