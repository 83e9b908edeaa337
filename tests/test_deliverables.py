"""What a user takes away from a build: the model card, Ollama Modelfiles, the exports for
text-generation-webui / LlamaChat / transformers, and the quality gates.

One tiny-demo build (GGUF f16 + q4_0 + q8_0, HF folder, legacy GGML, evaluation) is made once for the
module; the tests read what it published. The Modelfile's TEMPLATE is rendered with Go text/template
semantics (a small renderer of exactly the constructs it uses, and Go itself where ``go`` is
installed) following Ollama's rule for templates without ``.Messages``, and compared with the prompt
``zhllama chat`` sends llama.cpp; the webui template is rendered with Jinja as webui renders it; the
transformers export is loaded with AutoModelForCausalLM/AutoTokenizer and compared with the GGUF's
logits through llama.cpp.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import yaml
from _gguf_fixtures import llama_logits
from pydantic import ValidationError

from pipeline_lib import chat, demo, gates
from pipeline_lib.buildspec import BuildSpec, EvalOptions
from pipeline_lib.card import CardInputs, front_matter, rebuild_command, render_card
from pipeline_lib.errors import InputError, IntegrityError
from pipeline_lib.evaluate import Report
from pipeline_lib.export import Build, export, open_build, webui_template
from pipeline_lib.ollama import ollama_template, render_modelfile
from pipeline_lib.pipeline import build_graph, plan_build, run_build
from pipeline_lib.store import Store

pytestmark = pytest.mark.slow

EVAL = {"n_ctx": 64, "max_chunks": 4, "generate": False}


def _spec(out: Path, **kw) -> BuildSpec:
    return BuildSpec(model="tiny-demo", outputs=["gguf", "hf", "ggml"], quant_types=["q4_0", "q8_0"],
                     evaluation=EVAL, out_dir=str(out), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A finished tiny-demo build folder (its own $ZHLLAMA_HOME beside it)."""
    home = tmp_path_factory.mktemp("deliverables-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZHLLAMA_HOME", str(home))
        result = run_build(_spec(home / "builds" / "tiny-demo"), store=Store(home))
    return result.out_dir


# ------------------------------------------------------------------ the model card


def test_card_is_a_model_card_with_the_builds_provenance(built):
    card = (built / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["language"] == ["zh", "en"] and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] and "zhllama" in meta["tags"] and "synthetic" in meta["tags"]
    assert "base_model" not in meta  # the demo's base is a local folder, not a hub model
    lock = json.loads((built / "build-lock.json").read_text())
    for source in lock["sources"]:  # every input with its sha256 and what its source resolved to
        assert source["fingerprint"].split(":", 1)[1][:16] in card
        for digest in source["files"].values():
            assert f"`{digest}`" in card
    assert lock["fingerprints"]["gguf"] in card and lock["fingerprints"]["hf"] in card
    assert "tokenizer.model" in card and "no official hash published" in card
    for dist in ("torch", "llama-cpp-python", "gguf"):
        assert f"| {version(dist)} |" in card
    # the LoRAs in merge order
    assert card.index("1. `") < card.index("chinese-llama-plus-lora") < card.index("2. `") \
        < card.index("chinese-alpaca-plus-lora")
    # prompt, the release's sampling, the training template that differs
    assert chat.TEMPLATES["alpaca"].render([], "{instruction}").rstrip("\n") in card
    assert "temperature 0.2, top_k 40, top_p 0.9, repetition penalty 1.1" in card
    assert "### Instruction:\n{instruction}\n\n### Response: " in card
    # the evaluation table (from report.json) and the plot
    report = Report.load(built / "report")
    for row in report.table():
        line = next(ln for ln in card.splitlines() if ln.startswith(f"| {row['variant']} |"))
        if not row["reference"]:
            assert f"{row['mean_kld']:.6f}" in line and f"{100 * row['top1_agreement']:.2f}%" in line
    assert "](report/report.png)" in card and (built / "report" / "report.png").is_file()
    assert "zhllama build tiny-demo --spec build-lock.json" in card


def test_the_cards_rebuild_command_rebuilds_the_same_build(built, monkeypatch, capsys):
    from flows.cli.main import main

    monkeypatch.setenv("ZHLLAMA_HOME", str(built.parent.parent))
    assert main(["build", "tiny-demo", "--spec", str(built / "build-lock.json"), "--no-prefect"]) == 0
    assert "cache hits: nothing was recomputed" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [], ["--quant", "q4_K_M", "--quant", "q8_0"], ["--output", "pth", "--output", "gguf", "--no-eval"],
    ["--output", "ggml", "--ggml-type", "q8_0", "--outtype", "f32", "--dtype", "float32", "--precise"],
    ["--base", "/models/llama-7b", "--base-revision", "v1", "--require-official"],
])
def test_rebuild_command_round_trips_through_the_cli(argv, tmp_path):
    """The card's flag form, parsed by `zhllama build`, is the very spec it was made from."""
    from flows.cli.flow import _spec_from
    from flows.cli.main import build_parser

    def spec_of(args_list):
        args = build_parser(["build"]).parse_args(["build", *args_list])
        return _spec_from(args.model, args)

    original = spec_of(["alpaca-plus-7b", *argv])
    command = rebuild_command(original.model_dump(mode="json"))
    assert command is not None and command.split()[:3] == ["zhllama", "build", "alpaca-plus-7b"]
    assert spec_of(command.split()[2:]) == original


def test_rebuild_command_falls_back_to_the_lock_when_flags_cannot_say_it():
    spec = BuildSpec(model="alpaca-plus-7b", evaluation={"n_ctx": 128}).model_dump(mode="json")
    assert rebuild_command(spec) is None
    assert rebuild_command(BuildSpec(model="alpaca-plus-7b").model_dump(mode="json")) == "zhllama build alpaca-plus-7b"


def test_card_of_a_catalog_model_names_the_release_and_the_hub():
    spec = BuildSpec(model="alpaca-plus-7b")
    sources = [{"role": "base", "kind": "hub", "source": "hf://huggyllama/llama-7b@main", "revision": None,
                "repo": "huggyllama/llama-7b", "resolved": "hub:" + "1" * 40},
               {"role": "lora-0", "kind": "hub", "source": "hf://hfl/chinese-llama-plus-lora-7b@main", "revision": None,
                "repo": "hfl/chinese-llama-plus-lora-7b", "resolved": "hub:" + "2" * 40},
               {"role": "lora-1", "kind": "hub", "source": "hf://hfl/chinese-alpaca-plus-lora-7b@main",
                "revision": None, "repo": "hfl/chinese-alpaca-plus-lora-7b", "resolved": "hub:" + "3" * 40}]
    official = {"model": "alpaca-plus-7b", "matches": True, "pth_built": True, "files": [
        {"file": "consolidated.00.pth", "sha256": "a" * 64, "status": "matches",
         "message": "matches the official Chinese-Alpaca-Plus-7B consolidated.00.pth (aaaaaaaa…)"}]}
    card = render_card(CardInputs(
        name="alpaca-plus-7b", display="Chinese-Alpaca-Plus-7B", model="alpaca-plus-7b", tokenizer="alpaca",
        spec=spec.model_dump(mode="json"), sources=sources, official=official,
        inputs=[{"role": "lora-1", "file": "adapter_model.bin", "size": 1, "sha256": "b" * 64, "status": "official",
                 "against": "official"}],
        files=[("alpaca-plus-7b-q4_0.gguf", "gguf-quant:variant=q4_0"), ("Modelfile", "modelfile:variant=q4_0")],
        fingerprints={"pth": "c" * 64}, versions={"zhllama": "0.1.0"}, modelfiles={"q4_0": "Modelfile"},
        default_variant="q4_0"))
    meta = front_matter(card)
    assert meta["base_model"] == "huggyllama/llama-7b" and meta["license"] == "other" and "alpaca-plus" in meta["tags"]
    assert card.index("Chinese-LLaMA-Plus-7B LoRA") < card.index("Chinese-Alpaca-Plus-7B LoRA")
    assert f"hub commit `{'3' * 40}`" in card and "matches the official Chinese-Alpaca-Plus-7B" in card
    assert "official (the release's SHA256)" in card and "zhllama build alpaca-plus-7b" in card
    assert "ollama create alpaca-plus-7b:q4_0 -f Modelfile" in card


def test_a_llama_card_says_plain_continuation():
    card = render_card(CardInputs(name="x", display="X", model="llama-7b", tokenizer="llama",
                                  spec=BuildSpec(model="llama-7b").model_dump(mode="json"), sources=[], inputs=[],
                                  files=[]))
    assert "plain language models" in card and "### Instruction" not in card.split("## Prompt")[1].split("## Eval")[0]


# ------------------------------------------------------------------ Ollama Modelfiles


def _parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(COMMAND, value) pairs: comments skipped, \"\"\"...\"\"\" values kept byte for byte, "..." unquoted."""
    out, i = [], 0
    while i < len(text):
        end = text.find("\n", i)
        line = text[i:end if end >= 0 else len(text)]
        if not line.strip() or line.startswith("#"):
            i = (end if end >= 0 else len(text)) + 1
            continue
        cmd, _, rest = line.partition(" ")
        if rest.startswith('"""') or rest.split(" ", 1)[-1].startswith('"""'):
            start = text.index('"""', i) + 3
            stop = text.index('"""', start)
            head = rest.split('"""')[0].strip()
            out.append((cmd, (head + " " if head else "") + text[start:stop]))
            i = text.index("\n", stop) + 1 if "\n" in text[stop:] else len(text)
            continue
        out.append((cmd, rest))
        i = (end if end >= 0 else len(text)) + 1
    return out


_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)


def _parse_go(template: str):
    """The Go text/template constructs the Modelfiles use: text, {{ .Field }}, {{ if .Field }}…{{ end }}."""
    root: list = []
    stack = [root]
    pos = 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            stack[-1].append(("text", template[pos:m.start()]))
        action = m.group(1)
        if action.startswith("if "):
            node = ("if", action[3:].strip().lstrip("."), [])
            stack[-1].append(node)
            stack.append(node[2])
        elif action == "end":
            stack.pop()
        else:
            assert re.fullmatch(r"\.\w+", action), f"construct the test renderer does not know: {action!r}"
            stack[-1].append(("field", action[1:]))
        pos = m.end()
    if pos < len(template):
        root.append(("text", template[pos:]))
    assert len(stack) == 1, "unbalanced {{ if }} / {{ end }}"
    return root


def _exec(nodes, values) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(values.get(node[1], ""))
        elif values.get(node[1]):  # Go: the empty string is false
            out.append(_exec(node[2], values))
    return "".join(out)


def _cut_at_response(nodes):
    """Ollama's last turn: the template up to (without) the first {{ .Response }}, in tree order."""
    kept, cut = [], False
    for node in nodes:
        if cut:
            break
        if node == ("field", "Response"):
            cut = True
            break
        if node[0] == "if":
            inner = _cut_at_response(node[2])
            cut = len(inner) < len(node[2]) or any(n == ("field", "Response") for n in node[2])
            kept.append(("if", node[1], inner))
        else:
            kept.append(node)
    return kept


def _ollama_calls(messages: list[dict]) -> list[dict]:
    """Ollama's executions of a template without .Messages (template.Execute): each finished turn with
    its System (only the first's), Prompt and Response; the last one cut at {{ .Response }}."""
    calls, system, prompt, response = [], "", "", ""
    for m in messages:
        if m["role"] == "system":
            if prompt or response:
                calls.append({"System": system, "Prompt": prompt, "Response": response})
                system = prompt = response = ""
            system = m["content"]
        elif m["role"] == "user":
            if response:
                calls.append({"System": system, "Prompt": prompt, "Response": response})
                system = prompt = response = ""
            prompt = m["content"]
        else:
            response = m["content"]
    return calls + [{"System": system, "Prompt": prompt, "Response": response, "Last": True}]


def ollama_render(template: str, system: str | None, turns: list[tuple[str, str]], prompt: str) -> str:
    """What Ollama renders for a chat: the Modelfile's SYSTEM first, then the turns."""
    tree = _parse_go(template)
    messages = ([{"role": "system", "content": system}] if system else [])
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": prompt})
    return "".join(_exec(_cut_at_response(tree) if c.get("Last") else tree, c) for c in _ollama_calls(messages))


GO_RENDERER = r'''
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type call struct {
	System, Prompt, Response string
	Last                     bool
}

func main() {
	var in struct {
		Template string
		Calls    []call
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	full := template.Must(template.New("modelfile").Parse(in.Template))
	var out strings.Builder
	for _, c := range in.Calls {
		t := full
		if c.Last { // the template's top-level nodes before {{ .Response }}
			root := full.Tree.Root.CopyList()
			var kept []parse.Node
			for _, n := range root.Nodes {
				if a, ok := n.(*parse.ActionNode); ok && strings.TrimSpace(a.Pipe.String()) == ".Response" {
					break
				}
				kept = append(kept, n)
			}
			root.Nodes = kept
			t = template.Must(template.New("last").AddParseTree("last", &parse.Tree{Root: root}))
		}
		values := map[string]string{"System": c.System, "Prompt": c.Prompt, "Response": c.Response}
		if err := t.Execute(&out, values); err != nil {
			panic(err)
		}
	}
	fmt.Print(out.String())
}
'''


def go_render(template: str, calls: list[dict], tmp_path: Path) -> str:
    prog = tmp_path / "render.go"
    prog.write_text(GO_RENDERER)
    env = {"PATH": "/usr/bin:/bin:/usr/local/go/bin", "HOME": str(tmp_path), "GOCACHE": str(tmp_path / "gocache"),
           "GOPATH": str(tmp_path / "gopath"), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    res = subprocess.run(["go", "run", str(prog)], input=json.dumps({"Template": template, "Calls": [
        {"System": c["System"], "Prompt": c["Prompt"], "Response": c["Response"], "Last": bool(c.get("Last"))}
        for c in calls]}), capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_modelfile_per_gguf_variant(built):
    assert {p.name for p in built.glob("Modelfile*")} == {"Modelfile", "Modelfile.f16", "Modelfile.q4_0",
                                                          "Modelfile.q8_0"}
    ctx = chat.gguf_context_length(built / "tiny-demo-q4_0.gguf")
    for mf, variant in (("Modelfile", "q4_0"), ("Modelfile.f16", "f16"), ("Modelfile.q8_0", "q8_0")):
        text = (built / mf).read_text()
        cmds = _parse_modelfile(text)
        assert cmds[0] == ("FROM", f"./tiny-demo-{variant}.gguf") and (built / f"tiny-demo-{variant}.gguf").is_file()
        params = [v for c, v in cmds if c == "PARAMETER"]
        assert 'stop "### Instruction:"' in params and 'stop "</s>"' in params
        assert {"temperature 0.2", "top_k 40", "top_p 0.9", "repeat_penalty 1.1", f"num_ctx {ctx}"} <= set(params)
        assert f"-f {mf}" in text
    # the default Modelfile is the q4_0 one (the first quantization), apart from its own name
    assert (built / "Modelfile").read_text().replace("-f Modelfile\n", "-f Modelfile.q4_0\n") == \
        (built / "Modelfile.q4_0").read_text()


def test_the_modelfile_template_renders_what_zhllama_chat_sends(built, tmp_path):
    cmds = dict(_parse_modelfile((built / "Modelfile").read_text()))
    template, system = cmds["TEMPLATE"], cmds["SYSTEM"]
    llm = chat.load_model(built / "tiny-demo-q4_0.gguf", n_ctx=512)
    try:
        session = chat.ChatSession(llm, chat.detect_template(built / "tiny-demo-q4_0.gguf"),
                                   sampling=chat.Sampling.greedy(), max_tokens=8)
        first = session.reply("你好，介绍一下你自己。")
        prompts = [session.last_prompt]
        assert first.strip(), "the test needs a non-empty first reply"
        session.reply("Say it again in English.")
        prompts.append(session.last_prompt)
    finally:
        llm.close()
    history = [("你好，介绍一下你自己。", first.strip())]
    assert ollama_render(template, system, [], "你好，介绍一下你自己。") == prompts[0]
    assert ollama_render(template, system, history, "Say it again in English.") == prompts[1]
    # and the template alone: one turn is exactly the release's Alpaca prompt
    assert prompts[0] == chat.ALPACA_PREAMBLE + "### Instruction:\n\n你好，介绍一下你自己。\n\n### Response:\n\n"
    if shutil.which("go") is None:
        pytest.skip("go is not installed: the Go cross-check of the renderer did not run")
    for turns, text, want in (([], "你好，介绍一下你自己。", prompts[0]), (history, "Say it again in English.", prompts[1])):
        messages = [{"role": "system", "content": system}]
        for u, r in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": r}]
        messages.append({"role": "user", "content": text})
        assert go_render(template, _ollama_calls(messages), tmp_path) == want


def test_plain_template_for_llama_models():
    t = ollama_template(chat.TEMPLATES["plain"])
    assert t.system is None and t.stop == ("</s>",)
    plain = chat.TEMPLATES["plain"]
    assert ollama_render(t.template, None, [], "从前有座山，") == plain.render([], "从前有座山，")
    assert ollama_render(t.template, None, [("从前有座山，", "山里有座庙。")], "庙里") == \
        plain.render([("从前有座山，", "山里有座庙。")], "庙里")
    text = render_modelfile("m-q4_0.gguf", template="plain", model="llama-7b", display="Chinese-LLaMA-7B",
                            variant="q4_0", modelfile="Modelfile", context_length=2048)
    assert "SYSTEM" not in text and 'PARAMETER stop "</s>"' in text and "num_ctx 2048" in text


def test_the_test_renderer_follows_go_semantics():
    """The constructs as Go defines them: an empty string is false, a missing field renders empty."""
    tree = _parse_go("a{{ if .System }}[{{ .System }}]{{ end }}b{{ .Prompt }}c")
    assert _exec(tree, {"System": "", "Prompt": "P"}) == "abPc"
    assert _exec(tree, {"System": "S", "Prompt": ""}) == "a[S]bc"
    assert _exec(_cut_at_response(_parse_go("x{{ .Prompt }}y{{ .Response }}z")), {"Prompt": "p"}) == "xpy"


# ------------------------------------------------------------------ exports


def test_export_transformers_loads_and_matches_the_gguf(built, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export(built, target="transformers", out=tmp_path / "tf")
    folder = res.out
    assert folder == tmp_path / "tf" / "tiny-demo" and (folder / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    text = "你好，世界！Hello world"
    vocab = chat.load_vocab(built / "tiny-demo-f16.gguf")
    try:
        cpp_tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        vocab.close()
    tokens = tok(text).input_ids
    assert tokens == cpp_tokens  # the exported tokenizer tokenizes as the GGUF's vocabulary does
    ours = llama_logits(built / "tiny-demo-f16.gguf", tokens)
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())  # llama.cpp's f16 arithmetic
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _webui_prompt(jinja: str, messages: list[dict]) -> str:
    """text-generation-webui's instruct prompt: the template without the generation prompt, plus the
    reply prefix it finds between two rendered assistant messages (its get_generation_prompt)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(jinja)
    dummy = t.render(messages=[{"role": "assistant", "content": "<<|user-message-1|>>"},
                               {"role": "assistant", "content": "<<|user-message-2|>>"}], add_generation_prompt=False)
    between = dummy.split("<<|user-message-1|>>")[1].split("<<|user-message-2|>>")[0]
    suffix = dummy.split("<<|user-message-2|>>")[1]
    prefix = between[len(suffix):].rstrip(" ")
    prompt = t.render(messages=messages, add_generation_prompt=False) + prefix
    assert prompt == t.render(messages=messages, add_generation_prompt=True)  # the two readings agree
    return prompt


def test_export_webui_layout_template_and_settings(built, tmp_path):
    webui = tmp_path / "text-generation-webui"
    (webui / "models").mkdir(parents=True)
    (webui / "models" / "config-user.yaml").write_text("^my-other-model$:\n  mode: chat\n")
    res = export(built, target="webui", out=webui)
    gguf = webui / "models" / "tiny-demo" / "tiny-demo-q4_0.gguf"
    assert res.out == webui / "models" / "tiny-demo" and gguf.read_bytes() == (built / "tiny-demo-q4_0.gguf").read_bytes()
    settings = yaml.safe_load((webui / "models" / "config-user.yaml").read_text())
    assert settings["^my-other-model$"] == {"mode": "chat"}  # merged, not replaced
    mine = next(v for k, v in settings.items() if re.match(k, "tiny-demo"))
    assert mine["mode"] == "instruct" and mine["instruction_template"] == "zhllama-Chinese-Alpaca"
    assert mine["truncation_length"] == chat.gguf_context_length(gguf)
    jinja = yaml.safe_load((webui / "instruction-templates" / "zhllama-Chinese-Alpaca.yaml").read_text())[
        "instruction_template"]
    alpaca = chat.TEMPLATES["alpaca"]
    assert _webui_prompt(jinja, [{"role": "user", "content": "你好"}]) == alpaca.render([], "你好")
    two = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
           {"role": "user", "content": "再见"}]
    assert _webui_prompt(jinja, two) == alpaca.render([("你好", "你好！")], "再见")
    with pytest.raises(InputError, match="already exists"):
        export(built, target="webui", out=webui)
    res = export(built, target="webui", out=webui, variant="hf", overwrite=True)
    assert (res.out / "config.json").is_file() and not (res.out / "tiny-demo-q4_0.gguf").exists()


def test_webui_template_for_plain_models():
    jinja = webui_template(chat.TEMPLATES["plain"])
    plain = chat.TEMPLATES["plain"]
    two = [{"role": "user", "content": "从前"}, {"role": "assistant", "content": "有座山"},
           {"role": "user", "content": "山里"}]
    assert _webui_prompt(jinja, two[:1]) == plain.render([], "从前")
    assert _webui_prompt(jinja, two) == plain.render([("从前", "有座山")], "山里")


def test_export_webui_uses_user_data_of_webui_3(built, tmp_path):
    (tmp_path / "webui" / "user_data").mkdir(parents=True)
    res = export(built, target="webui", out=tmp_path / "webui", variant="q8_0")
    assert res.out == tmp_path / "webui" / "user_data" / "models" / "tiny-demo"
    assert (tmp_path / "webui" / "user_data" / "instruction-templates" / "zhllama-Chinese-Alpaca.yaml").is_file()


def test_export_llamachat_names_the_model_type(built, tmp_path):
    res = export(built, target="llamachat", out=tmp_path / "lc")
    info = json.loads((tmp_path / "lc" / "llamachat.json").read_text())
    assert info["model_type"] == "Alpaca" and info["file"] == "tiny-demo-ggml-q4_0.bin"
    assert (tmp_path / "lc" / info["file"]).read_bytes()[:4] == b"tjgg"  # ggjt magic, little-endian
    assert any("'Alpaca'" in n for n in res.notes)
    llama = Build(folder=built, name="tiny-demo", display="d", spec=open_build(built).spec, published=(),
                  tokenizer="llama", catalog_model="llama-plus-33b")
    res = export(llama, target="llamachat", out=tmp_path / "lc2")
    info = json.loads((tmp_path / "lc2" / "llamachat.json").read_text())
    assert info["model_type"] == "LLaMA" and info["model_size"] == "30B"  # LlamaChat calls 33B 30B


def test_export_errors_say_what_to_build(built, tmp_path, monkeypatch):
    from flows.cli.main import main

    gguf_only = tmp_path / "home" / "builds" / "g"
    (gguf_only).mkdir(parents=True)
    lock = json.loads((built / "build-lock.json").read_text())
    lock["spec"] = {**lock["spec"], "outputs": ["gguf"]}
    (gguf_only / "build-lock.json").write_text(json.dumps(lock))
    shutil.copy(built / "tiny-demo-q4_0.gguf", gguf_only)
    with pytest.raises(InputError, match="--output hf") as err:
        export(gguf_only, target="transformers", out=tmp_path / "x")
    assert "zhllama build tiny-demo --output gguf --output hf" in str(err.value)
    with pytest.raises(InputError, match="--output ggml"):
        export(gguf_only, target="llamachat", out=tmp_path / "x")
    with pytest.raises(InputError, match="q5_0 GGUF"):
        export(built, target="webui", out=tmp_path / "x", variant="q5_0")
    with pytest.raises(InputError, match="inside the build folder"):
        export(built, target="transformers", out=built / "exports")
    monkeypatch.setenv("ZHLLAMA_HOME", str(tmp_path / "home"))
    assert main(["export", "nosuch", "--for", "webui", "--to", str(tmp_path / "w")]) == 1
    assert main(["export", "g", "--for", "webui", "--to", str(tmp_path / "w")]) == 0  # by name: builds/g


# ------------------------------------------------------------------ quality gates


def _row(v, kl, top1, ratio=1.0, ref=False):
    return {"variant": v, "reference": ref, "mean_kld": kl, "top1_agreement": top1, "ppl_ratio": ratio}


def test_gates_check_pass_fail_and_broken():
    table = [_row("f16", 0.0, 1.0, ref=True), _row("q4_0", 0.12, 0.9, 1.03), _row("q2_K", 0.5, 0.4, 1.4)]
    in_force = gates.resolve({"q4_0": {"max_mean_kl": 0.1, "min_top1": 0.85}, "q2_K": {}}, variants=["q4_0", "q2_K"],
                             defaults=True)
    assert "q2_K" not in in_force  # {} turns the default off
    results = gates.check(table, in_force, enforce_broken=True)
    failed = gates.failures(results)
    assert [(g.variant, g.metric) for g in failed] == [("q4_0", "max_mean_kl"), ("q2_K", gates.BROKEN)]
    assert failed[0].describe() == "q4_0: mean KL divergence 0.120000 > limit 0.1 (max_mean_kl)"
    assert "q2_K: top-1 agreement 40.00% < 50% of the reference's" in failed[1].describe()
    assert next(g for g in results if g.metric == "min_top1").passed
    assert not gates.failures(gates.check(table, {}, enforce_broken=False))  # flagged, not enforced
    missing = gates.check([_row("q4_0", None, None)], {"q4_0": {"limits": {"max_mean_kl": 1}, "source": "x"}},
                          enforce_broken=True)
    assert gates.failures(missing) and "not measured" in missing[0].describe()


def test_default_gates_are_llama_cpps_published_ranges():
    assert gates.DEFAULT_GATES["q4_0"] == {"max_mean_kl": round(2 * 0.071940, 6)}
    assert gates.DEFAULT_GATES["q8_0"] == {"max_mean_kl": round(2 * 0.001355, 6)}
    from pipeline_lib.buildspec import QUANT_TYPES

    assert set(gates.DEFAULT_GATES) == set(QUANT_TYPES)  # every type zhllama offers has a published value
    for q, l2 in gates.LLAMA_CPP_MEAN_KLD_L2_7B.items():  # LLaMA 2 7B loses less than the LLaMA 3 8B limits
        assert l2 < gates.LLAMA_CPP_MEAN_KLD[q]
    real = plan_build(BuildSpec(model="alpaca-plus-7b", quant_types=["q4_0", "q5_K_M"]), store_root=Path("/tmp"))
    report = next(n for n in build_graph(real) if n.id == "report")
    assert report.params["gates"] == {"q4_0": {"limits": {"max_mean_kl": 0.14388}, "source": gates.DEFAULT_SOURCE},
                                      "q5_K_M": {"limits": {"max_mean_kl": 0.021524}, "source": gates.DEFAULT_SOURCE}}
    assert report.params["enforce_broken"] is True
    synthetic = plan_build(demo.demo_spec(), store_root=Path("/tmp"))
    report = next(n for n in build_graph(synthetic) if n.id == "report")
    assert report.params["gates"] == {} and report.params["enforce_broken"] is False


def test_gates_in_the_spec_are_validated():
    assert EvalOptions(gates={"q4_0": {"max_mean_kl": 0.1}}).gates == {"q4_0": {"max_mean_kl": 0.1}}
    for bad, msg in (({"q4_0": {"max_kl": 0.1}}, "unknown gate 'max_kl'"), ({"q4_0": {"max_mean_kl": -1}}, ">= 0")):
        with pytest.raises(ValidationError, match=msg):
            EvalOptions(gates=bad)
    with pytest.raises(ValidationError, match="does not quantize to"):
        BuildSpec(model="tiny-demo", quant_types=["q4_0"], evaluation={"gates": {"q8_0": {"max_mean_kl": 0.1}}})
    with pytest.raises(ValidationError, match="needs the evaluation"):
        BuildSpec(model="tiny-demo", evaluation={"enabled": False, "gates": {"q4_0": {"max_mean_kl": 0.1}}})
    # the gates judge the evaluations; they are not part of the evaluations' keys
    a = build_graph(plan_build(demo.demo_spec(), store_root=Path("/tmp")))
    b = build_graph(plan_build(demo.demo_spec().model_copy(update={"evaluation": demo.demo_spec().evaluation.model_copy(
        update={"gates": {"q4_0": {"max_mean_kl": 0.5}}})}), store_root=Path("/tmp")))
    assert [n.params for n in a if n.stage.startswith("evaluate")] == [n.params for n in b if n.stage.startswith("evaluate")]


def test_the_report_marks_each_gate(built):
    report = Report.load(built / "report")
    broken = {g.variant: g for g in report.gates if g.metric == gates.BROKEN}
    assert set(broken) == {"q4_0", "q8_0"} and not any(g.enforced for g in broken.values())
    assert "## Quality gates" in (built / "report" / "report.md").read_text()


def test_a_failed_gate_fails_the_build_and_publishes_nothing(built, tmp_path, monkeypatch):
    home = built.parent.parent
    monkeypatch.setenv("ZHLLAMA_HOME", str(home))
    out = tmp_path / "gated"
    q4 = next(r for r in Report.load(built / "report").table() if r["variant"] == "q4_0")
    spec = _spec(out, ).model_copy(update={"evaluation": EvalOptions(**EVAL, gates={"q4_0": {"max_mean_kl": 0.001}})})
    with pytest.raises(IntegrityError) as err:
        run_build(spec, store=Store(home))
    text = str(err.value)
    assert f"q4_0: mean KL divergence {q4['mean_kld']:.6f} > limit 0.001 (max_mean_kl)" in text
    assert "q8_0" not in text.split("expected")[0] or "broken" in text
    assert not out.exists()


def test_a_broken_quant_fails_a_real_model_whatever_the_gates_say(tmp_path, monkeypatch):
    """The catalog model built from the demo's random weights: its q4_0 agrees with f16 on under half of
    the tokens, so it is broken: the build fails although the spec turned q4_0's KL gate off."""
    home = tmp_path / "home"
    monkeypatch.setenv("ZHLLAMA_HOME", str(home))
    root = demo.ensure_demo_release(home)
    r = demo.ROLES
    spec = BuildSpec(model="alpaca-plus-7b", base={"source": str(root / r["base"])},
                     loras=[{"source": str(root / r["lora-0"])}, {"source": str(root / r["lora-1"])}],
                     chinese_sp={"source": str(root / r["chinese_sp"])}, quant_types=["q4_0"],
                     evaluation={**EVAL, "gates": {"q4_0": {}}}, out_dir=str(tmp_path / "out"))
    with pytest.raises(IntegrityError, match="q4_0: top-1 agreement .* < 50% of the reference's") as err:
        run_build(spec, store=Store(home))
    assert "max_mean_kl" not in str(err.value)
    assert not (tmp_path / "out").exists()
