"""``zhllama export``: a finished build laid out the way another program expects it.

``export(build, target=..., out=DIR)`` for a build folder (``open_build(NAME or path)``):

* ``webui`` (text-generation-webui): ``DIR/models/<name>/`` with one GGUF variant (the build's default,
  see ``graph.default_variant``; ``variant=`` picks another) or the HF files (``variant="hf"``), the
  instruction template ``DIR/instruction-templates/<template>.yaml`` (the prompt ``zhllama chat`` uses,
  as the Jinja template webui renders) and an entry in ``DIR/models/config-user.yaml`` (merged into an
  existing one) that gives the model folder that template, instruct mode and its context length.
  Where ``DIR/user_data`` exists (webui 3.x keeps models and templates there) that is used instead.
* ``llamachat`` (LlamaChat, macOS): the legacy GGML file in ``DIR`` plus ``llamachat.json`` saying
  the model type it must be added as (``Alpaca`` for Chinese-Alpaca, ``LLaMA`` for Chinese-LLaMA)
  and the size to pick (7B, 13B, 30B for the release's 33B).
* ``transformers``: ``DIR/<name>/``: the merged HF folder (config, safetensors, tokenizer), loadable
  with ``AutoModelForCausalLM.from_pretrained(DIR/<name>)`` (no remote code).

Large files are hard-linked from the build folder where the filesystem allows (no extra space), else
copied; every file is written atomically and every output is claimed before anything is written. A
needed output the build does not have is an InputError that says which ``--output`` to add.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import chat
from .errors import InputError
from .fsutil import atomic_dir, atomic_path, claim_output, write_text_atomic

log = logging.getLogger(__name__)

LOCK = "build-lock.json"

# webui instruction-template file names, per chat template
WEBUI_TEMPLATES: dict[str, str] = {"alpaca": "zhllama-Chinese-Alpaca", "plain": "zhllama-Chinese-LLaMA"}
# LlamaChat's chat-source types and model sizes (its ChatSourceType / ModelSize enums)
LLAMACHAT_TYPES: dict[str, str] = {"alpaca": "Alpaca", "llama": "LLaMA"}
LLAMACHAT_SIZES: dict[str, str] = {"7B": "7B", "13B": "13B", "33B": "30B"}


@dataclass(frozen=True)
class Build:
    """A finished build folder, as its build-lock.json describes it."""

    folder: Path
    name: str
    display: str
    spec: Mapping[str, Any]
    published: tuple[str, ...]
    tokenizer: str  # "alpaca" | "llama"
    catalog_model: str | None = None

    @property
    def outputs(self) -> list[str]:
        return list(self.spec.get("outputs", []))

    def gguf(self, variant: str) -> Path:
        return self.folder / f"{self.name}-{variant}.gguf"

    def ggml(self, variant: str) -> Path:
        return self.folder / f"{self.name}-ggml-{variant}.bin"

    def rebuild_hint(self, output: str) -> str:
        """The build command that adds ``output`` (for error messages)."""
        outs = [*self.outputs, output]
        model = "custom --spec build-lock.json" if self.spec.get("model") == "custom" else self.spec.get("model")
        return f"zhllama build {model} " + " ".join(f"--output {o}" for o in dict.fromkeys(outs))


@dataclass(frozen=True)
class ExportResult:
    target: str
    out: Path  # the folder the user points their program at
    files: tuple[Path, ...]
    linked: int  # files hard-linked (the rest copied or written)
    notes: tuple[str, ...] = field(default_factory=tuple)  # how to load it, for people


def builds_root(home: str | os.PathLike[str] | None = None) -> Path:
    from .store import default_root

    return (Path(home) if home is not None else default_root()) / "builds"


def open_build(name: str | os.PathLike[str], *, home: str | os.PathLike[str] | None = None) -> Build:
    """A build by model name (``$ZHLLAMA_HOME/builds/NAME``) or by folder path."""
    raw = os.fspath(name)
    path = Path(raw).expanduser()
    folder = path if (path / LOCK).is_file() else builds_root(home) / raw
    lock_path = folder / LOCK
    if not lock_path.is_file():
        root = builds_root(home)
        built = sorted(p.name for p in root.iterdir() if (p / LOCK).is_file()) if root.is_dir() else []
        raise InputError(f"no finished build {raw!r} (no {lock_path})",
                         expected="a built model's name (a folder under " f"{root}) or a build folder path",
                         fix=("built here: " + ", ".join(built)) if built else
                         f"build it first: `zhllama build {raw}` (or `zhllama demo`)")
    try:
        lock = json.loads(lock_path.read_text(encoding="utf-8"))
        spec = dict(lock["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read {lock_path} ({exc})", expected="the build-lock.json a build publishes",
                         fix="build the model again") from None
    name_ = lock.get("model") or spec.get("name") or spec.get("model")
    tokenizer = lock.get("tokenizer") or _tokenizer_of(folder, name_, spec)
    return Build(folder=folder, name=name_, display=lock.get("display") or name_, spec=spec,
                 published=tuple(lock.get("published", ())), tokenizer=tokenizer,
                 catalog_model=lock.get("catalog_model"))


def _tokenizer_of(folder: Path, name: str, spec: Mapping[str, Any]) -> str:
    """For locks written before they recorded it: the spec's override, the catalog's, the GGUF's vocabulary."""
    from . import catalog

    if spec.get("tokenizer"):
        return spec["tokenizer"]
    try:
        return catalog.get(spec.get("model", "")).tokenizer
    except InputError:
        pass
    ggufs = sorted(folder.glob(f"{name}-*.gguf"))
    return chat.gguf_vocab_kind(ggufs[0]) if ggufs else "alpaca"


# ------------------------------------------------------------------ placing files


def _place(src: Path, dest: Path) -> bool:
    """``dest`` := ``src`` atomically: a hard link where possible (True), else a copy (False)."""
    with atomic_path(dest) as tmp:
        tmp.unlink()  # atomic_path made it empty; a link needs the name free
        try:
            os.link(src, tmp)
            return True
        except OSError:  # another filesystem, or links not allowed: a copy
            shutil.copyfile(src, tmp)
            return False


def _need(path: Path, build: Build, output: str, what: str) -> Path:
    if not path.exists():
        raise InputError(f"the build {build.name} has no {what} ({path.name})",
                         expected=f"a build with --output {output}",
                         fix=f"build it with that output: `{build.rebuild_hint(output)}`")
    return path


def _variant(build: Build, variant: str | None, *, allow_hf: bool) -> str:
    """The variant to export: given, else the build's default GGUF (first quantization, else the float
    one), else (webui) the HF folder."""
    if variant is not None:
        return variant
    if "gguf" in build.outputs:
        quants = build.spec.get("quant_types") or []
        return quants[0] if quants else build.spec.get("outtype", "f16")
    if allow_hf and "hf" in build.outputs:
        return "hf"
    raise InputError(f"the build {build.name} has no GGUF" + (" and no HF folder" if allow_hf else ""),
                     expected="a build with --output gguf" + (" (or --output hf)" if allow_hf else ""),
                     fix=f"build it with that output: `{build.rebuild_hint('gguf')}`")


def _context_length(build: Build, variant: str) -> int | None:
    if variant == "hf":
        try:
            cfg = json.loads((build.folder / "hf" / "config.json").read_text(encoding="utf-8"))
            return int(cfg.get("max_position_embeddings") or 0) or None
        except (OSError, ValueError):
            return None
    return chat.gguf_context_length(build.gguf(variant)) or None


# ------------------------------------------------------------------ text-generation-webui


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def webui_template(template: chat.PromptTemplate) -> str:
    """The Jinja instruction template text-generation-webui renders (``messages``, ``add_generation_prompt``)
    for ``template``: one user turn + ``add_generation_prompt`` (or webui's own prefix rule) gives
    ``template.render([], text)``, and every earlier exchange is laid out as ``template.render`` does.

    The turn ``"### Instruction:\\n\\n{instruction}\\n\\n### Response:\\n\\n"`` is split into the user part
    (up to the end of the line breaks after the instruction) and the assistant's prefix (the rest), as
    webui's templates split them, so webui finds the reply's prefix where it looks for it."""
    before, _, after = template.turn.partition("{instruction}")
    user_suffix = after[:len(after) - len(after.lstrip("\n"))]
    bot_prefix = after[len(user_suffix):]
    system = template.preamble.rstrip("\n")
    sep = template.preamble[len(system):] or "\n"
    lines = ["{%- set ns = namespace(found=false) -%}",
             "{%- for message in messages -%}",
             "    {%- if message['role'] == 'system' -%}{%- set ns.found = true -%}{%- endif -%}",
             "{%- endfor -%}"]
    if system:
        lines.append(f"{{%- if not ns.found -%}}{{{{- {_jinja_str(template.preamble)} -}}}}{{%- endif -%}}")
    lines += ["{%- for message in messages -%}",
              "    {%- if message['role'] == 'system' -%}",
              f"        {{{{- message['content'] + {_jinja_str(sep)} -}}}}",
              "    {%- elif message['role'] == 'user' -%}",
              f"        {{{{- {_jinja_str(before)} + message['content'] + {_jinja_str(user_suffix)} -}}}}",
              "    {%- else -%}",
              f"        {{{{- {_jinja_str(bot_prefix)} + message['content'] + {_jinja_str(template.reply_separator)} -}}}}",
              "    {%- endif -%}",
              "{%- endfor -%}",
              f"{{%- if add_generation_prompt -%}}{{{{- {_jinja_str(bot_prefix)} -}}}}{{%- endif -%}}"]
    return "\n".join(lines)


def webui_template_yaml(template: chat.PromptTemplate) -> str:
    """The instruction-templates/*.yaml file: ``instruction_template: |-`` and the Jinja text."""
    import yaml

    jinja = webui_template(template)
    text = "instruction_template: |-\n" + "".join(f"  {line}\n" for line in jinja.splitlines())
    if yaml.safe_load(text) != {"instruction_template": jinja}:  # a literal block keeps it byte for byte
        raise InputError(f"prompt template {template.name!r} cannot be written as a YAML literal block")
    return text


def _merge_webui_settings(path: Path, pattern: str, settings: Mapping[str, Any]) -> None:
    """Set ``pattern: settings`` in webui's ``models/config-user.yaml``, keeping every other entry."""
    import yaml

    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"cannot read {path} ({str(exc).splitlines()[0]})",
                             expected="text-generation-webui's models/config-user.yaml (YAML)",
                             fix="fix or move that file, then export again") from None
        if not isinstance(current, dict):
            raise InputError(f"{path} is not a mapping of model patterns to settings",
                             expected="text-generation-webui's models/config-user.yaml", fix="fix or move that file")
    current[pattern] = dict(settings)
    write_text_atomic(path, yaml.safe_dump(current, sort_keys=False, allow_unicode=True))


def export_webui(build: Build, out: Path, *, variant: str | None = None, overwrite: bool = False) -> ExportResult:
    v = _variant(build, variant, allow_hf=True)
    root = out / "user_data" if (out / "user_data").is_dir() else out  # webui 3.x keeps models in user_data/
    files = _source_files(build, v)
    model_dir = claim_output(root / "models" / build.name, kind="dir", overwrite=overwrite,
                             what="the webui model folder", inputs=[build.folder])
    template = chat.TEMPLATES[chat.TEMPLATE_FOR_VOCAB[build.tokenizer]]
    template_name = WEBUI_TEMPLATES[template.name]
    template_file = root / "instruction-templates" / f"{template_name}.yaml"
    settings_file = root / "models" / "config-user.yaml"
    ctx = _context_length(build, v)
    linked = 0
    with atomic_dir(model_dir, replace=True) as tmp:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            linked += _place(src, tmp / rel)
    template_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(template_file, webui_template_yaml(template))
    settings = {"mode": "instruct", "instruction_template": template_name}
    if ctx:
        settings["truncation_length"] = ctx
    pattern = "^" + re.escape(build.name.lower()) + "$"  # webui matches patterns against the folder name
    _merge_webui_settings(settings_file, pattern, settings)
    written = tuple(model_dir / rel for rel in files) + (template_file, settings_file)
    what = "the GGUF " + ", ".join(sorted(files)) if v != "hf" else "the HF files"
    notes = (f"text-generation-webui: start it on {root.parent if root.name == 'user_data' else root} and load "
             f"the model '{build.name}' ({what}); its settings in models/config-user.yaml select the "
             f"instruction template '{template_name}' (instruct mode"
             + (f", context {ctx}" if ctx else "") + ").",)
    return ExportResult("webui", model_dir, written, linked, notes)


def _source_files(build: Build, variant: str) -> dict[str, Path]:
    """Files of one variant (relative name in the export -> path in the build folder)."""
    if variant == "hf":
        hf = _need(build.folder / "hf", build, "hf", "HF folder")
        return {p.relative_to(hf).as_posix(): p for p in sorted(hf.rglob("*")) if p.is_file()}
    path = build.gguf(variant)
    if not path.is_file():
        built = sorted(p.name.removeprefix(f"{build.name}-").removesuffix(".gguf")
                       for p in build.folder.glob(f"{build.name}-*.gguf"))
        if not built:
            _need(path, build, "gguf", "GGUF")
        raise InputError(f"the build {build.name} has no {variant} GGUF ({path.name})",
                         expected="one of its variants: " + ", ".join(built + (["hf"] if "hf" in build.outputs
                                                                               else [])),
                         fix=f"pick one with --variant, or build that quantization (--quant {variant})")
    return {path.name: path}


# ------------------------------------------------------------------ LlamaChat


def export_llamachat(build: Build, out: Path, *, variant: str | None = None, overwrite: bool = False) -> ExportResult:
    from . import catalog

    if "ggml" not in build.outputs:
        raise InputError(f"the build {build.name} has no legacy GGML file (LlamaChat reads only those)",
                         expected="a build with --output ggml",
                         fix=f"build it with that output: `{build.rebuild_hint('ggml')}`")
    v = variant or (build.spec.get("ggml_types") or ["q4_0"])[0]
    src = build.ggml(v)
    if not src.is_file():
        built = sorted(p.name for p in build.folder.glob(f"{build.name}-ggml-*.bin"))
        raise InputError(f"the build {build.name} has no {v} GGML file ({src.name})",
                         expected="one of: " + (", ".join(built) or "(none)"),
                         fix=f"pick one with --variant, or build it with --ggml-type {v}")
    claim_output(out, kind="into", what="--to")
    dest = claim_output(out / src.name, overwrite=overwrite, what="the GGML file", inputs=[src])
    info_path = claim_output(out / "llamachat.json", overwrite=True, what="llamachat.json")
    kind = LLAMACHAT_TYPES[build.tokenizer]
    size = "unknown"
    if build.catalog_model:
        size = LLAMACHAT_SIZES.get(catalog.get(build.catalog_model).size, "unknown")
    out.mkdir(parents=True, exist_ok=True)
    linked = _place(src, dest)
    info = {"file": dest.name, "model_type": kind, "model_size": size, "format": f"ggml (ggjt v3), {v}",
            "display": build.display,
            "how": f"LlamaChat: Add Chat Source → {kind} → choose the .ggml/.bin file {dest.name}"
                   + (f" → model size {size}" if size != "unknown" else "")}
    write_text_atomic(info_path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    notes = (f"LlamaChat: add a chat source of type '{kind}' (not "
             f"'{next(t for t in LLAMACHAT_TYPES.values() if t != kind)}') and choose {dest}"
             + (f"; model size {size}" if size != "unknown" else "") + ".",)
    return ExportResult("llamachat", out, (dest, info_path), int(linked), notes)


# ------------------------------------------------------------------ transformers


def export_transformers(build: Build, out: Path, *, variant: str | None = None,
                        overwrite: bool = False) -> ExportResult:
    if variant not in (None, "hf"):
        raise InputError(f"--variant {variant} with --for transformers", expected="the HF folder (no --variant)",
                         fix="drop --variant: transformers loads the merged HF checkpoint")
    files = _source_files(build, "hf")
    model_dir = claim_output(out / build.name, kind="dir", overwrite=overwrite, what="the transformers folder",
                             inputs=[build.folder])
    linked = 0
    with atomic_dir(model_dir, replace=True) as tmp:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            linked += _place(src, tmp / rel)
    notes = (f"transformers: AutoModelForCausalLM.from_pretrained({str(model_dir)!r}) and "
             f"AutoTokenizer.from_pretrained({str(model_dir)!r}) (local files, no remote code).",)
    return ExportResult("transformers", model_dir, tuple(model_dir / rel for rel in files), linked, notes)


# ------------------------------------------------------------------ the table


TARGETS: dict[str, tuple[Callable[..., ExportResult], str]] = {
    "webui": (export_webui, "text-generation-webui: models/<name>/ (GGUF or HF) + instruction template + settings"),
    "llamachat": (export_llamachat, "LlamaChat: the legacy GGML file + the model type to add it as"),
    "transformers": (export_transformers, "transformers: the merged HF folder"),
}


def export(build: Build | str | os.PathLike[str], *, target: str, out: str | os.PathLike[str],
           variant: str | None = None, overwrite: bool = False) -> ExportResult:
    """Lay ``build`` out for ``target`` (a key of ``TARGETS``) under ``out``."""
    if target not in TARGETS:
        raise InputError(f"unknown export target {target!r}", expected=" or ".join(TARGETS))
    if not isinstance(build, Build):
        build = open_build(build)
    out = claim_output(out, kind="into", what="--to", inputs=[build.folder])
    here, folder = out.resolve(), build.folder.resolve()
    if here == folder or folder in here.parents:
        raise InputError(f"--to {out} is inside the build folder {build.folder}",
                         expected="a folder outside the build (the next build replaces the build folder)",
                         fix="export somewhere else, e.g. --to ~/text-generation-webui")
    return TARGETS[target][0](build, out, variant=variant, overwrite=overwrite)
