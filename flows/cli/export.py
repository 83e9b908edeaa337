"""``zhllama export NAME --for webui|llamachat|transformers --to DIR``: a build laid out for another program."""

from __future__ import annotations

FOR_HELP = {
    "webui": "text-generation-webui: DIR/models/NAME/ (a GGUF variant, or --variant hf for the HF files), "
             "DIR/instruction-templates/ and DIR/models/config-user.yaml (DIR = the webui folder; its user_data/ "
             "when that exists)",
    "llamachat": "LlamaChat: the legacy GGML file in DIR and llamachat.json naming the model type to add it as",
    "transformers": "transformers: DIR/NAME/ = the merged HF folder (AutoModelForCausalLM.from_pretrained)",
}


def register(sub) -> None:
    p = sub.add_parser("export", help="lay a built model out for text-generation-webui, LlamaChat or transformers",
                       description="Export a finished build (NAME = a model built under $ZHLLAMA_HOME/builds, or a "
                       "build folder) in the layout another program expects. Large files are hard-linked where "
                       "possible, else copied. " + " ".join(f"{k}: {v}." for k, v in FOR_HELP.items()))
    p.add_argument("name", metavar="NAME", help="a built model's name (e.g. alpaca-plus-7b, tiny-demo) or a build "
                   "folder path")
    p.add_argument("--for", dest="target", required=True, choices=sorted(FOR_HELP),
                   help="the program: " + "; ".join(f"{k} = {v.split(':')[0]}" for k, v in FOR_HELP.items()))
    p.add_argument("--to", dest="out", required=True, metavar="DIR", help="where to lay it out (webui: its folder)")
    p.add_argument("--variant", metavar="V", help="which file: a GGUF variant (q4_0, q8_0, f16, ...; default: the "
                   "build's first quantization) or hf (webui); a GGML type for llamachat (default: the first)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of this model")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline_lib.export import export

    res = export(args.name, target=args.target, out=args.out, variant=args.variant, overwrite=args.overwrite)
    for f in res.files:
        print(f"  {f}")
    placed = f"{res.linked} hard-linked, {len(res.files) - res.linked} written/copied"
    print(f"exported for {res.target}: {res.out} ({placed})")
    for note in res.notes:
        print(note)
    return 0
