"""Chat templates: render a list of messages to prompt text with the model's own Jinja template.

The template comes from the model (GGUF `tokenizer.chat_template`, or `tokenizer_config.json` /
`chat_template.jinja` in a HF directory) and is untrusted code, so it runs in Jinja's immutable sandbox
with the environment and globals transformers gives it (`raise_exception`, `strftime_now`, a
non-escaping `tojson`, `trim_blocks`, `lstrip_blocks`, loop controls). Rendering the same messages
here and in transformers gives the same text.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it only renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def read_chat_template(value: str, key: str = "model.chat_template") -> str:
    """`model.chat_template` (or another template setting, `key`): the template itself when it contains "{{" or
    "{%", else a file to read. Raises ValueError naming the key when the file is missing or the template does not
    compile."""
    source = value
    if "{{" not in value and "{%" not in value:
        try:
            with open(os.path.expanduser(value), encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            raise ValueError(f"{key}: cannot read {value!r} ({e.strerror})") from None
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{key}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return source


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
    **kwargs: Any,
) -> str:
    """Prompt text for `messages`. `special_tokens` maps `bos_token`, `eos_token`, ... to their text;
    `kwargs` (tools, documents, enable_thinking, ...) reach the template as variables."""
    # NOTE: like transformers, keys whose value is None are dropped: many templates test `'key' in message`
    # and would otherwise render a literal "None".
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {**special_tokens, **kwargs}
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    return compile_chat_template(source).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **context
    )
