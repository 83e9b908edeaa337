"""The model card: ``README.md`` in every build folder, in the Hugging Face model-card format.

YAML front matter (``base_model`` when the base came from the hub, ``language: [zh, en]``,
``license``, ``tags``, ``pipeline_tag: text-generation``), then:

* what the model is: the release's name, the base, the LoRAs in the order they were merged;
* the files of the build folder and how to use them (Ollama, llama.cpp, ``zhllama export``);
* the prompt template ``zhllama chat`` and the Modelfiles use, the release's sampling settings, and
  the template the release trained Chinese-Alpaca with (it differs: see ``TRAINING_TEMPLATE``);
* the evaluation table, the quality gates and the plot (``report/report.png``);
* provenance: every input file with its sha256 and whether it is an official file of the release,
  what each source resolved to (hub commit, local folder digest, URL), the official-hash result of
  what was built (tokenizer, merged pth), the tensor fingerprint, the software versions;
* the exact command that rebuilds it.

Everything comes from what the build recorded (verify.json, official.json, the fingerprints, the
report); nothing is measured again. ``render_card(CardInputs) -> str`` is pure; the card stage
(``pipeline_lib.pipeline.stages``) gathers the inputs from the store entries and writes the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import chat
from .fsutil import human_bytes, write_text_atomic

CARD_FILE = "README.md"
PLOT = "report/report.png"

# The template the release fine-tuned Chinese-Alpaca with (its scripts/training/build_dataset.py):
# one newline after the instruction marker, a space after the response marker. Its inference docs
# (llama.cpp -ins) and zhllama chat use the double-newline template of chat.TEMPLATES["alpaca"].
TRAINING_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")

# License of the weights, by who made them (front matter; the body says why).
LICENSES: dict[str, dict[str, str]] = {
    "release": {"license": "other", "license_name": "llama-license",
                "license_link": "https://github.com/ymcui/Chinese-LLaMA-Alpaca"},
    "synthetic": {"license": "apache-2.0"},
}
LICENSE_TEXT: dict[str, str] = {
    "release": "The weights are Meta's LLaMA with the release's LoRAs merged in: they are under the LLaMA "
               "model license (non-commercial research use) and the Chinese-LLaMA-Alpaca release's terms "
               "(academic research only, no commercial use). zhllama itself is Apache-2.0.",
    "synthetic": "A synthetic model made by zhllama from random weights (a test of the pipeline, not a language "
                 "model): Apache-2.0, like zhllama.",
}

# What each output is, for the file list (published name pattern -> description), in the order shown.
OUTPUT_WORDS: dict[str, str] = {
    "gguf-float": "float GGUF ({outtype}): the evaluation's reference; quantizations start from it",
    "gguf-quant": "llama.cpp {variant} quantization",
    "ggml": "legacy GGML (ggjt v3, {variant}) for 2023 tools (LlamaChat, old llama.cpp)",
    "modelfile": "Ollama Modelfile for {variant}",
    "hf/": "merged model, Hugging Face format (safetensors + config + tokenizer): transformers, webui",
    "pth/": "merged model, Meta's consolidated.NN.pth layout (the release's own merged format)",
    "tokenizer/": "the merged Chinese tokenizer (tokenizer.model + its configs)",
    "report/": "evaluation report (report.md with speed, memory and samples; report.json; report.png)",
    "official.json": "what was built, checked against the release's published SHA256",
    "fingerprints/": "per-tensor sha256 of every float output",
    "build-lock.json": "sources, what they resolved to, every input file's sha256 (the rebuild's spec)",
}

SOFTWARE: tuple[tuple[str, str], ...] = (("zhllama", "zhllama"), ("torch", "torch"),
                                         ("llama-cpp-python", "llama.cpp (llama-cpp-python, bundled)"),
                                         ("gguf", "gguf"), ("transformers", "transformers"))


@dataclass(frozen=True)
class CardInputs:
    """Everything the card says, as recorded by the build."""

    name: str  # build name (file names)
    display: str  # "Chinese-Alpaca-Plus-7B"
    model: str | None  # catalog key, None for tiny-demo / custom
    tokenizer: str  # "alpaca" | "llama"
    spec: Mapping[str, Any]  # the BuildSpec as JSON
    sources: Sequence[Mapping[str, Any]]  # plan order: role, kind, source, revision, resolved
    inputs: Sequence[Mapping[str, Any]]  # verify.json rows: role, file, size, sha256, status, against
    files: Sequence[tuple[str, str]]  # (published name, kind key of OUTPUT_WORDS + format values)
    official: Mapping[str, Any] | None = None  # official.json
    fingerprints: Mapping[str, str] = field(default_factory=dict)  # output -> digest
    report: Any = None  # evaluate.Report
    versions: Mapping[str, str] = field(default_factory=dict)
    modelfiles: Mapping[str, str] = field(default_factory=dict)  # variant -> Modelfile name (default first)
    default_variant: str | None = None
    synthetic: bool = False


def versions() -> dict[str, str]:
    """Installed versions of the software a build runs on (``SOFTWARE``), "not installed" when absent."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {}
    for dist, _ in SOFTWARE:
        if dist == "zhllama":
            out[dist] = __version__
            continue
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ------------------------------------------------------------------ the parts


def _front_matter(c: CardInputs) -> list[str]:
    from . import catalog

    lines = ["---"]
    base = next((s for s in c.sources if s["role"] == "base"), None)
    if base is not None and base.get("kind") == "hub":
        lines.append(f"base_model: {base['repo']}")
    lines += ["language:", "- zh", "- en"]
    lic = LICENSES["synthetic" if c.synthetic else "release"]
    lines += [f"{k}: {v}" for k, v in lic.items()]
    lines += ["library_name: gguf", "pipeline_tag: text-generation", "tags:"]
    tags = ["llama", "chinese", "chinese-llama-alpaca", "gguf", "llama.cpp", "zhllama"]
    if c.tokenizer == "alpaca":
        tags.insert(3, "alpaca")
    if c.model is not None:
        tags.append(catalog.get(c.model).family)
    if c.synthetic:
        tags.append("synthetic")
    lines += [f"- {t}" for t in tags]
    return lines + ["---", ""]


def _what(c: CardInputs) -> list[str]:
    from . import catalog

    entry = catalog.get(c.model) if c.model else None
    by_role = {s["role"]: s for s in c.sources}
    loras = [s for s in c.sources if s["role"].startswith("lora-")]
    title = f"# {c.display}" + (" (rebuilt by zhllama)" if entry else "")
    lines = [title, ""]
    if entry is not None:
        lines.append(f"**{entry.display}** of the Chinese-LLaMA-Alpaca release "
                     "([ymcui/Chinese-LLaMA-Alpaca](https://github.com/ymcui/Chinese-LLaMA-Alpaca)), rebuilt by "
                     "zhllama from Meta's LLaMA and the release's LoRA weights, merged as the release's scripts "
                     "merge them.")
    elif c.synthetic and c.spec.get("model") == "tiny-demo":
        lines.append(f"**{c.display}**: zhllama's offline demo, a tiny random-weight model laid out like "
                     "Chinese-Alpaca-Plus (a LLaMA base, the LLaMA-Plus LoRA, then the Alpaca-Plus LoRA) and built "
                     "by the same pipeline as the release's models. Its numbers show the shape of a build, not a "
                     "language model's quality.")
    else:
        lines.append(f"**{c.display}**: a custom chain of LoRAs merged into a LLaMA base by zhllama.")
    lines += ["", f"- base: {_source_text(by_role.get('base'))}"]
    names = [lo.release_name for lo in entry.lora_chain] if entry is not None else []
    lines.append("- LoRAs, merged in this order:" if loras else "- LoRAs: none")
    for i, s in enumerate(loras):
        label = f"{names[i]} LoRA: " if i < len(names) else ""
        lines.append(f"  {i + 1}. {label}{_source_text(s)}")
    kind = {"alpaca": "Chinese-Alpaca", "llama": "Chinese-LLaMA"}[c.tokenizer]
    size = catalog.VOCAB_SIZES[c.tokenizer] if entry is not None else None
    lines.append(f"- tokenizer: the merged {kind} tokenizer" + (f" ({size} pieces)" if size else "")
                 + (" from the LLaMA tokenizer and the release's chinese_sp.model" if "chinese_sp" in by_role else ""))
    arithmetic = "float32, one rounding (--precise)" if c.spec.get("precise") else \
        "the release's (fp16, rounded after each LoRA)"
    lines += [f"- merge arithmetic: {arithmetic}; merged dtype {c.spec.get('dtype', 'float16')}", ""]
    return lines


def _source_text(s: Mapping[str, Any] | None) -> str:
    if s is None:
        return "(none)"
    text = f"`{s['source']}`"
    resolved = s.get("resolved") or ""
    if resolved.startswith("hub:"):
        text += f" at commit `{resolved[4:]}`"
    return text


def _files(c: CardInputs) -> list[str]:
    lines = ["## Files", "", "| file | what |", "|---|---|"]
    order = list(OUTPUT_WORDS)
    # by kind (stable: graph order within one), the default `Modelfile` before the per-variant ones
    rows = sorted(((n, *_split_kind(k)) for n, k in c.files), key=lambda r: (order.index(r[1]), r[0] != "Modelfile"))
    for name, kind, values in rows:
        lines.append(f"| `{name}` | {OUTPUT_WORDS[kind].format(**values)} |")
    return lines + [""]


def _split_kind(kind: str) -> tuple[str, dict[str, str]]:
    """'gguf-quant:variant=q4_0' -> ('gguf-quant', {'variant': 'q4_0'})."""
    key, _, rest = kind.partition(":")
    values = dict(part.split("=", 1) for part in rest.split(",") if part)
    return key, values


def _use(c: CardInputs) -> list[str]:
    from .ollama import ollama_tag

    lines = ["## Use it", ""]
    if c.modelfiles:
        default = c.default_variant or next(iter(c.modelfiles))
        lines += ["**Ollama** (in this folder):", "", "```sh",
                  f"ollama create {ollama_tag(c.name, default)} -f Modelfile", f"ollama run {ollama_tag(c.name, default)}",
                  "```", "",
                  "`Modelfile` is the " + default + " variant's; `" + "`, `".join(
                      n for v, n in c.modelfiles.items() if n != "Modelfile") + "` are one per variant.", ""]
    ggufs = [n for n, k in c.files if k.startswith("gguf-")]
    if ggufs:
        pick = next((n for n, k in c.files if k == f"gguf-quant:variant={c.default_variant}"), ggufs[0])
        lines += ["**zhllama** (llama.cpp, the release's template and sampling):", "", "```sh", f"zhllama chat {pick}",
                  f"zhllama generate {pick} \"用一句话介绍北京。\"", "```", ""]
    lines += ["**text-generation-webui, LlamaChat, transformers**: `zhllama export " + c.name
              + " --for webui|llamachat|transformers --to DIR` lays the files out as each expects "
              "(webui: the model folder and its instruction template; LlamaChat: the GGML file and the model type "
              "to load it as; transformers: the HF folder).", ""]
    return lines


def _prompt(c: CardInputs) -> list[str]:
    name = chat.TEMPLATE_FOR_VOCAB[c.tokenizer]
    t = chat.TEMPLATES[name]
    s = chat.RELEASE_CHAT
    lines = ["## Prompt template and sampling", ""]
    if name == "alpaca":
        lines += ["Chinese-Alpaca models follow instructions in the Alpaca format. `zhllama chat`, the Modelfiles "
                  "and the webui template send exactly this (llama.cpp's `-ins` mode, as the release documented it), "
                  "`{instruction}` being the user's text (the prompt ends with the blank line after "
                  "`### Response:`; the answer follows it):", "", "```text",
                  t.render([], "{instruction}").rstrip("\n"), "", "```", "",
                  "In a conversation each earlier turn stays in the context: its reply follows `### Response:` and a "
                  "blank line separates it from the next `### Instruction:`. Generation stops at `### Instruction:` "
                  "or the end-of-sequence token.", "",
                  "Note: the release *fine-tuned* Chinese-Alpaca with a slightly different template "
                  "(`scripts/training/build_dataset.py`): one newline after `### Instruction:` and a space, not a "
                  "blank line, after `### Response:` (the prompt ends with that space):", "", "```text",
                  TRAINING_TEMPLATE, "```", "",
                  "The release's own inference instructions use the llama.cpp form above, and so does zhllama; "
                  "if you call the model from your own code, either works, the training form is the one it saw.", ""]
    else:
        lines += ["Chinese-LLaMA models are plain language models, not instruction-tuned: give them the beginning "
                  "of a text and they continue it (no template; `zhllama chat` and the Modelfiles send the text as "
                  "is). For instructions, use a Chinese-Alpaca model.", ""]
    lines += ["Recommended sampling (the release's llama.cpp settings): "
              f"temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}, repetition penalty "
              f"{s['repeat_penalty']} (`--temp {s['temperature']} --top-k {s['top_k']} --top-p {s['top_p']} "
              f"--repeat-penalty {s['repeat_penalty']}`; the Modelfiles set them).", ""]
    return lines


def _evaluation(c: CardInputs) -> list[str]:
    from .gates import BROKEN

    r = c.report
    if r is None:
        return ["## Evaluation", "", "Not evaluated (built with the evaluation off).", ""]
    gates: dict[str, list] = {}
    for g in r.gates:
        gates.setdefault(g.variant, []).append(g)
    settings = r.settings
    lines = ["## Evaluation", "",
             f"Measured by zhllama through llama.cpp on `{r.text.get('source')}` ({r.text.get('tokens')} tokens; "
             f"perplexity as `llama-perplexity` computes it, n_ctx {settings.get('n_ctx')}, "
             f"{settings.get('n_chunks')} chunk(s); KL divergence and top-1 agreement against "
             f"**{r.reference}**, as its `--kl-divergence` defines them).", "",
             "| variant | file size | bits/weight | PPL | PPL(Q)/PPL(ref) | mean KL | top-1 agreement | gates |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in r.table():
        v = row["variant"]
        ref = row["reference"]
        ppl = "–" if row["ppl"] is None else f"{row['ppl']:.4f} ± {row['ppl_uncertainty']:.4f}"
        ratio = "1 (reference)" if ref else ("–" if row["ppl_ratio"] is None else f"{row['ppl_ratio']:.4f}")
        kl = "0" if ref else ("–" if row["mean_kld"] is None else f"{row['mean_kld']:.6f}")
        top = "100%" if ref else ("–" if row["top1_agreement"] is None else f"{100 * row['top1_agreement']:.2f}%")
        mine = gates.get(v, [])
        failed = [("broken: top-1 < 50%" if g.metric == BROKEN else f"{g.metric} {g.status}")
                  + ("" if g.enforced else " (flagged, not enforced)") for g in mine if not g.passed]
        checked = [g.metric for g in mine if g.metric != BROKEN]
        if ref:
            shown = "reference"
        elif failed:
            shown = "; ".join(failed)
        elif mine:
            shown = "pass" + (f" ({', '.join(checked)})" if checked else " (not broken; no gates)")
        else:
            shown = "–"
        lines.append(f"| {v} | {human_bytes(row['file_bytes'])} | {row['bits_per_weight']:.2f} | {ppl} | {ratio} | "
                     f"{kl} | {top} | {shown} |")
    lines += ["", f"![file size vs perplexity and KL divergence]({PLOT})", ""]
    if r.gates:
        from .evaluate import render_gates

        lines += [line.replace("## Quality gates", "### Quality gates") for line in render_gates(r.gates)]
        if c.synthetic:
            lines += ["No default gates apply to a synthetic model; a broken-looking quantization of a tiny "
                      "random-weight model is flagged but does not fail its build.", ""]
    lines += ["Speed, memory, tokenizer efficiency and sample answers: [report/report.md](report/report.md).", ""]
    return lines


STATUS_WORDS = {"official": "official (the release's SHA256)", "expected": "matches the given SHA256",
                "unknown": "no known digest (recorded, not vouched for)"}


def _provenance(c: CardInputs) -> list[str]:
    lines = ["## Provenance", "", "### Sources", "", "| role | source | resolved to |", "|---|---|---|"]
    for s in c.sources:
        resolved = s.get("resolved") or ""
        kind, _, value = resolved.partition(":")
        shown = {"hub": f"hub commit `{value}`", "local": f"local files, stat digest `{value[:16]}…`",
                 "url": "URL (release files are immutable)"}.get(kind, resolved or "–")
        rev = f" (revision `{s['revision']}`)" if s.get("revision") else ""
        lines.append(f"| {s['role']} | `{s['source']}`{rev} | {shown} |")
    lines += ["", "### Input files", "", "| role | file | size | sha256 | checked against |", "|---|---|---:|---|---|"]
    for row in c.inputs:
        status = STATUS_WORDS.get(row["status"], row["status"])
        lines.append(f"| {row['role']} | `{row['file']}` | {human_bytes(row['size'])} | `{row['sha256']}` | {status} |")
    lines += ["", "### What was built", ""]
    if c.official is not None:
        for row in c.official.get("files", []):
            lines.append(f"- `{row['file']}` (sha256 `{row['sha256']}`): {row['message']}")
        if not c.official.get("pth_built"):
            lines.append("- merged weights: not compared with the release's published merged SHA256 (they are "
                         "published for the Meta `consolidated.NN.pth` layout: build with `--output pth` to check)")
    for output, digest in c.fingerprints.items():
        lines.append(f"- tensor fingerprint of the {output} output: `{digest}` (`fingerprints/{output}.json`: "
                     "sha256 of every tensor)")
    if len(set(c.fingerprints.values())) == 1 and len(c.fingerprints) > 1:
        lines.append(f"- the {', '.join(c.fingerprints)} outputs hold the same tensors (one fingerprint)")
    lines += ["", "### Software", "", "| | version |", "|---|---|"]
    lines += [f"| {words} | {c.versions.get(dist, '–')} |" for dist, words in SOFTWARE if dist in c.versions]
    return lines + [""]


def _rebuild(c: CardInputs) -> list[str]:
    flags = rebuild_command(c.spec)
    model = "custom" if c.spec.get("model") == "custom" else c.spec.get("model")
    lines = ["## Rebuild", ""]
    if flags is not None:
        lines += ["```sh", flags, "```", "", "or, with this build's spec exactly as recorded (from this folder):", ""]
    else:
        lines += ["This build's spec is read back from its lock (from this folder):", ""]
    lines += ["```sh", f"zhllama build {model} --spec build-lock.json", "```", "",
              "The sources resolve again when rebuilt (a hub branch may have moved); every input file is checked "
              "against the SHA256 above, and the published files are identical for identical inputs (the store "
              "keys and the fingerprints say so). To pin a hub source, give its commit from the table above as "
              "its `revision` in the spec.", ""]
    return lines


# ------------------------------------------------------------------ rebuild command


_DEFAULTS = {"outputs": ["gguf"], "quant_types": ["q4_0", "q8_0"], "ggml_types": ["q4_0"], "outtype": "f16",
             "dtype": "float16"}
# spec field -> CLI flag for the list/scalar options the command line has (data, not branches)
_FLAGS: dict[str, str] = {"outputs": "--output", "quant_types": "--quant", "ggml_types": "--ggml-type",
                          "outtype": "--outtype", "dtype": "--dtype"}


def rebuild_command(spec: Mapping[str, Any]) -> str | None:
    """The ``zhllama build`` command line that makes ``spec`` (a BuildSpec's JSON), or None when the
    command line cannot say it (evaluation options, pinned digests or revisions of LoRAs, a tokenizer
    override, no quantization): then ``--spec build-lock.json`` is the way."""
    from .buildspec import EvalOptions

    defaults = EvalOptions().model_dump()
    evaluation = dict(spec.get("evaluation") or {})
    if any(evaluation.get(k, v) != v for k, v in defaults.items() if k != "enabled"):
        return None
    if spec.get("tokenizer") is not None or (not spec.get("quant_types") and "gguf" in spec.get("outputs", [])):
        return None
    for key in ("loras", "chinese_sp"):
        value = spec.get(key)
        items = value if isinstance(value, list) else [value] if value else []
        if any(i.get("revision") or i.get("sha256") for i in items):
            return None
    base = spec.get("base")
    if base and base.get("sha256"):
        return None
    custom = spec.get("model") == "custom"
    words = ["zhllama", "build", spec["name"] if custom else spec["model"]]
    if base:
        words += ["--base", base["source"]] + (["--base-revision", base["revision"]] if base.get("revision") else [])
    for lora in spec.get("loras") or []:
        words += ["--lora", lora["source"]]
    if spec.get("chinese_sp"):
        words += ["--chinese-sp", spec["chinese_sp"]["source"]]
    for key, flag in _FLAGS.items():
        value = spec.get(key, _DEFAULTS[key])
        if key == "ggml_types" and "ggml" not in spec.get("outputs", []):
            continue
        if value != _DEFAULTS[key]:
            if value == []:  # the command line cannot ask for none of a list
                return None
            words += [w for v in (value if isinstance(value, list) else [value]) for w in (flag, v)]
    if evaluation.get("enabled") is False:
        words.append("--no-eval")
    words += [flag for key, flag in (("precise", "--precise"), ("require_official", "--require-official"))
              if spec.get(key)]
    import shlex

    return " ".join(shlex.quote(str(w)) for w in words)


# ------------------------------------------------------------------ the card


def render_card(c: CardInputs) -> str:
    """The whole README.md."""
    parts = [_front_matter(c), _what(c), _files(c), _use(c), _prompt(c), _evaluation(c), _provenance(c),
             _rebuild(c), ["## License", "", LICENSE_TEXT["synthetic" if c.synthetic else "release"], ""]]
    return "\n".join(line for part in parts for line in part).rstrip("\n") + "\n"


def write_card(c: CardInputs, out: str | Path) -> Path:
    """Write ``README.md`` into folder ``out`` (atomically); its path."""
    path = Path(out) / CARD_FILE
    write_text_atomic(path, render_card(c))
    return path


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card as a dict (for checks and tests)."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}


def inline_plot(card: str, png: bytes | None) -> str:
    """The card with its plot as a data URI (a Prefect markdown artifact cannot reference local files)."""
    if not png:
        return card
    import base64

    return card.replace(f"]({PLOT})", "](data:image/png;base64," + base64.b64encode(png).decode() + ")")

