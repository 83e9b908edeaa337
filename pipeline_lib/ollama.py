"""Ollama Modelfiles for a build's GGUF variants: ``ollama create NAME -f Modelfile`` in the build folder.

Each Modelfile says ``FROM ./<variant>.gguf`` (the file beside it), the prompt template that
``zhllama chat`` uses (``chat.TEMPLATES``: the Alpaca instruction template for Chinese-Alpaca, plain
continuation for Chinese-LLaMA) written as an Ollama ``TEMPLATE`` (Go text/template with
``{{ .System }}``, ``{{ .Prompt }}`` and ``{{ .Response }}``), the template's preamble as ``SYSTEM``,
``PARAMETER stop`` for the template's markers and ``</s>``, the release's sampling settings
(``chat.RELEASE_CHAT``: temperature 0.2, top_k 40, top_p 0.9, repeat_penalty 1.1) and ``num_ctx``
= the model's training context.

The template is derived from the ``PromptTemplate`` (data, not a second copy of the prompt), so that
Ollama renders exactly what ``zhllama chat`` sends llama.cpp:

* one turn: ``SYSTEM`` + the preamble's separator + the turn with the user's text, ending with the
  response marker (what ``PromptTemplate.render([], text)`` gives);
* several turns: Ollama's rule for templates without ``.Messages`` renders each finished turn with
  its ``.Response`` (the system text only in the first) and cuts the last turn at ``{{ .Response }}``;
  the text after ``{{ .Response }}`` is the template's ``reply_separator``, so the history is laid out
  as ``zhllama chat`` lays it out.

Ollama's tokenizer adds BOS as llama.cpp's does (the GGUF's ``add_bos_token``), as ``zhllama chat``
does. tests/test_deliverables.py renders the TEMPLATE with Go text/template semantics (and with Go
itself where ``go`` is installed) and compares with ``PromptTemplate.render``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import chat
from .errors import InputError

# Ollama PARAMETER name -> key of the sampling preset (chat.RELEASE_CHAT), in the order written.
SAMPLING_PARAMETERS: dict[str, str] = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                                       "repeat_penalty": "repeat_penalty"}
EOS_TEXT = "</s>"  # LLaMA's end-of-sequence token as text: a stop string in case a frontend prints it
DEFAULT_NAME = "Modelfile"


@dataclass(frozen=True)
class OllamaTemplate:
    """A chat.PromptTemplate in Ollama's terms."""

    template: str  # the TEMPLATE (Go text/template)
    system: str | None  # the SYSTEM default (None: the template has no preamble)
    stop: tuple[str, ...]


def ollama_template(template: chat.PromptTemplate) -> OllamaTemplate:
    """``template`` as an Ollama TEMPLATE/SYSTEM/stop triple (see the module docstring)."""
    if "{instruction}" not in template.turn:
        raise InputError(f"prompt template {template.name!r} has no {{instruction}} in its turn",
                         expected="a turn with one {instruction}")
    system = template.preamble.rstrip("\n") or None
    head = ""
    if system is not None:
        head = "{{ if .System }}{{ .System }}" + template.preamble[len(system):] + "{{ end }}"
    text = head + template.turn.replace("{instruction}", "{{ .Prompt }}") + "{{ .Response }}" \
        + template.reply_separator
    for part in (text, system or ""):
        if '"""' in part:
            raise InputError(f"prompt template {template.name!r} holds \"\"\"", expected="text a Modelfile can quote")
    return OllamaTemplate(template=text, system=system, stop=(*template.stop, EOS_TEXT))


def modelfile_name(variant: str, *, default: bool = False) -> str:
    """``Modelfile`` for the build's default variant, ``Modelfile.<variant>`` for each variant."""
    return DEFAULT_NAME if default else f"{DEFAULT_NAME}.{variant}"


def ollama_tag(model: str, variant: str) -> str:
    """The name to ``ollama create``: the build's name, tagged with the variant (``alpaca-plus-7b:q4_0``)."""
    return f"{model.lower()}:{variant}"


def _quote(value: str) -> str:
    if '"' in value or "\n" in value:
        return f'"""{value}"""'
    return f'"{value}"'


def render_modelfile(gguf_file: str, *, template: str, model: str, display: str, variant: str,
                     modelfile: str, context_length: int | None = None,
                     sampling: Mapping[str, float] | None = None, version: str = "") -> str:
    """The Modelfile text for ``gguf_file`` (a file name in the same folder), ``template`` a key of
    ``chat.TEMPLATES``; ``sampling`` defaults to the release's chat settings."""
    sampling = dict(chat.RELEASE_CHAT if sampling is None else sampling)
    t = ollama_template(chat.get_template(template))
    made = f" (written by zhllama {version})" if version else ""
    lines = [
        f"# Ollama Modelfile: {display}, {variant}{made}",
        f"#   ollama create {ollama_tag(model, variant)} -f {modelfile}",
        f"#   prompt: {chat.TEMPLATES[template].description}; sampling: the release's llama.cpp settings",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{t.template}"""',
    ]
    if t.system is not None:
        lines.append(f'SYSTEM """{t.system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in t.stop]
    lines += [f"PARAMETER {name} {sampling[key]:g}" for name, key in SAMPLING_PARAMETERS.items()]
    if context_length:
        lines.append(f"PARAMETER num_ctx {int(context_length)}")
    return "\n".join(lines) + "\n"
