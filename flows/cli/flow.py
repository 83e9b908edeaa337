"""``zhllama demo | build | run``: the build graph from the command line and through Prefect.

* ``zhllama demo``    — the offline demo: tiny synthetic release → the whole build (through Prefect).
* ``zhllama build M`` — build one model (through Prefect, or ``--no-prefect`` with the plain
  executor); ``--plan`` prints the stage graph and runs nothing.
* ``zhllama run D``   — run a deployment on a server, like ``prefect deployment run 'build-model/D'``
  (``D`` may be ``alpaca-plus-7b``, ``build-alpaca-plus-7b`` or ``FLOW/DEPLOYMENT``).

The console shows one line per stage as it ends and a live progress line while one runs; Prefect's
own run logs (and any traceback) go to the Prefect database and UI only. A failed build ends with
zhllama's one-line ``error:`` message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline_lib.errors import InputError, ZhllamaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo: build a tiny synthetic model end to end (Prefect flow)",
                       description="Build a tiny synthetic Chinese-Alpaca-Plus release into $ZHLLAMA_HOME/demo-source "
                       "and run the whole build on it: download (local), verify, tokenizer merge, LoRA merge, GGUF, "
                       "q4_0 + q8_0, evaluation. A second run is all cache hits.")
    p.add_argument("--out", help="publish the results here (default: $ZHLLAMA_HOME/builds/tiny-demo)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation stages")
    p.add_argument("--no-prefect", action="store_true", help="run the stages with the plain executor, without Prefect")
    p.add_argument("--twice", action="store_true", help="run the build a second time to show the cache hits")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build", help="build one model of the catalog (download → … → evaluate)",
                       description="Build a catalog model (see `zhllama catalog`) or a custom chain "
                       "(a new name with --base and --lora). Runs the Prefect flow in this process "
                       "(a temporary local server unless PREFECT_API_URL is set).")
    p.add_argument("model", help="catalog name, e.g. alpaca-plus-7b; 'tiny-demo'; or a name for a custom build")
    p.add_argument("--spec", metavar="FILE", help="a BuildSpec as a JSON file, or a build's build-lock.json (its "
                   "spec: `zhllama build MODEL --spec build-lock.json` builds it again); the other options override it")
    p.add_argument("--base", metavar="SOURCE", help="base LLaMA source: hub repo, local folder, URL or archive")
    p.add_argument("--base-revision", metavar="REV", help="hub branch, tag or commit of --base (default: main)")
    p.add_argument("--lora", action="append", metavar="SOURCE", help="LoRA source, in merge order (repeat)")
    p.add_argument("--chinese-sp", metavar="SOURCE", help="chinese_sp.model source (for the tokenizer merge)")
    p.add_argument("--output", action="append", choices=["hf", "pth", "gguf", "ggml"],
                   help="what to produce (repeat; default gguf)")
    p.add_argument("--quant", action="append", metavar="TYPE",
                   help="llama.cpp quantization type (repeat; default q4_0 and q8_0)")
    p.add_argument("--ggml-type", action="append", metavar="TYPE", help="legacy GGML type (repeat; default q4_0)")
    p.add_argument("--outtype", choices=["f16", "f32", "bf16"],
                   help="float type of the GGUF that quantizations start from (default f16)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the merged weights (default float16)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation stages")
    p.add_argument("--precise", action="store_true", help="float32 merge arithmetic with one rounding (PEFT's) "
                   "instead of the release's; the merged files then cannot match the official SHA256")
    p.add_argument("--require-official", action="store_true", help="fail when a merged pth or the tokenizer "
                   "differs from the release's published SHA256 (add --output pth to check the merged weights)")
    p.add_argument("--out", metavar="DIR", help="publish the results here (default: $ZHLLAMA_HOME/builds/MODEL)")
    p.add_argument("--no-prefect", action="store_true", help="run the stages with the plain executor, without Prefect")
    p.add_argument("--runner", choices=["threads", "dask"],
                   help="where the Prefect tasks run: threads in this process (default) or a Dask cluster "
                   "(--dask-address, else a local one of --dask-workers processes)")
    p.add_argument("--dask-address", metavar="tcp://HOST:8786",
                   help="scheduler of a running Dask cluster whose workers have --resources memory_heavy=1 "
                   "(implies --runner dask)")
    p.add_argument("--dask-workers", type=int, metavar="N",
                   help="worker processes of the local Dask cluster (default 2; with --runner dask)")
    p.add_argument("--plan", action="store_true", help="print the stage graph (sources, stages, inputs, outputs) "
                   "and exit without running anything")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="run a deployment on the Prefect server (like `prefect deployment run`)",
                       description="`zhllama run alpaca-plus-7b` = `zhllama run build-alpaca-plus-7b` = "
                       "`prefect deployment run 'build-model/build-alpaca-plus-7b'`. Needs a server "
                       "(`zhllama server`) and PREFECT_API_URL.")
    p.add_argument("deployment", help="a model (alpaca-plus-7b), its deployment (build-alpaca-plus-7b), "
                   "check-upstream, or FLOW/DEPLOYMENT")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                   help="override a parameter, e.g. --param 'spec={\"model\":\"alpaca-plus-7b\",\"quant_types\":[\"q4_K_M\"]}'")
    p.add_argument("--job-variable", action="append", default=[], metavar="KEY=JSON",
                   help="work-pool job variable for this run, e.g. --job-variable 'env={\"ZHLLAMA_HOME\": \"/data/zh\"}'")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish; on failure print the failed "
                   "stage and its error")
    p.set_defaults(func=cmd_run)


# ------------------------------------------------------------------ builds in this process


def _stage_file(result, stage: str, name: str) -> Any:
    """The JSON file ``name`` (or, for ``meta:KEY``, that manifest meta value) of the first stage
    ``stage`` of a build that has it, or None."""
    from pipeline_lib.store import Store

    for run in result.stages:
        entry = Store().get(run.key) if run.stage == stage else None
        if entry is None:
            continue
        if name.startswith("meta:") and entry.meta.get(name[5:]):
            return entry.meta[name[5:]]
        if name in entry.outputs:
            return json.loads((entry.path / name).read_text(encoding="utf-8"))
    return None


def _official_lines(result) -> list[str]:
    """The post-merge audit line and what the official-hash check said about the build."""
    lines = []
    audit = _stage_file(result, "merge", "meta:audit") or _stage_file(result, "gguf", "meta:audit")
    if audit is not None:
        lines.append(f"  {audit['summary']}")
    gates = _stage_file(result, "gates", "gates.json")
    if gates is not None and gates["gates"]:
        shown = [f"{g['variant']} {g['status']}" + ("" if g["passed"] else f" ({g['metric']} {g['measured']:.4g}, "
                                                    f"limit {g['limit']:.4g})") for g in gates["gates"]]
        lines.append("  quality gates: " + "; ".join(shown))
    doc = _stage_file(result, "official", "official.json")
    if doc is not None:
        lines += [f"  {row['file']}: {row['message']}" for row in doc["files"]]
        if not doc["pth_built"]:
            lines.append("  merged weights: not checked (add --output pth to compare the merged consolidated.NN.pth "
                         "with the release's published SHA256)")
    return lines


def _summary(result) -> bool:
    """The official check, the cache summary and the output folder; True when every stage was a cache hit."""
    official = _official_lines(result)
    if official:
        print("checks:")
        print("\n".join(official))
    rows = result.stages
    hits = sum(r.cached for r in rows)
    if rows and hits == len(rows):
        print(f"all {len(rows)} stages were cache hits: nothing was recomputed ({result.seconds:.1f} s)")
    else:
        print(f"{len(rows) - hits} of {len(rows)} stages computed, {hits} from the cache ({result.seconds:.1f} s)")
    print(f"outputs: {result.out_dir}")
    return bool(rows) and hits == len(rows)


def _spec_from(model: str, args: argparse.Namespace, *, base: dict | None = None):
    from pydantic import ValidationError

    from pipeline_lib import catalog
    from pipeline_lib.buildspec import CUSTOM_MODEL, MODEL_NAMES, BuildSpec

    data: dict[str, Any] = dict(base or {})
    known = model in MODEL_NAMES or model.lower() in catalog._ALIASES
    if not known and getattr(args, "base", None) and getattr(args, "lora", None):
        data["model"], data["name"] = CUSTOM_MODEL, model  # `zhllama build my-chain --base B --lora L`
    elif not known and data.get("model") == CUSTOM_MODEL and data.get("name") == model:
        pass  # `zhllama build my-chain --spec build-lock.json` of a custom build
    else:
        data["model"] = model
    if getattr(args, "base", None):
        data["base"] = {"source": args.base, "revision": args.base_revision}
    if getattr(args, "lora", None):
        data["loras"] = [{"source": s} for s in args.lora]
    if getattr(args, "chinese_sp", None):
        data["chinese_sp"] = {"source": args.chinese_sp}
    for opt, key in (("output", "outputs"), ("quant", "quant_types"), ("ggml_type", "ggml_types"),
                     ("outtype", "outtype"), ("dtype", "dtype"), ("out", "out_dir")):
        if getattr(args, opt, None):
            data[key] = getattr(args, opt)
    if getattr(args, "no_eval", False):
        data["evaluation"] = {**data.get("evaluation", {}), "enabled": False}
    for flag in ("precise", "require_official"):
        if getattr(args, flag, False):
            data[flag] = True
    for opt in ("runner", "dask_address", "dask_workers"):
        if getattr(args, opt, None) is not None:
            data[opt] = getattr(args, opt)
    if getattr(args, "dask_address", None) and not getattr(args, "runner", None):
        data["runner"] = "dask"
    if getattr(args, "no_prefect", False) and data.get("runner") == "dask":
        raise InputError("--runner dask needs Prefect", fix="drop --no-prefect (the plain executor runs the "
                         "stages one after another in this process)")
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid build spec: {problems}", fix="see `zhllama build --help`") from None


def _run_spec(spec, *, no_prefect: bool):
    """Run a build with the plain executor or through Prefect, reporting to the console; a BuildResult."""
    from pipeline_lib.pipeline import build_graph, plan_build
    from pipeline_lib.pipeline.stages import REPORTER

    from .console import Console

    width = max(len(n.label) for n in build_graph(plan_build(spec)))
    token = REPORTER.set(Console(width=width))
    try:
        if no_prefect:
            from pipeline_lib.pipeline import run_build

            return run_build(spec)
        return _in_prefect(spec)
    finally:
        REPORTER.reset(token)


def _in_prefect(spec):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.build import build_model

    from .console import drain_prefect, local_server, quiet_prefect

    quiet_prefect()
    if _api_url():
        try:
            return build_model(spec)
        finally:
            drain_prefect()
    from pipeline_lib.store import default_root

    print("note: PREFECT_API_URL is not set: starting a temporary Prefect server for this run (10-20 s); "
          "`zhllama server` keeps one running with the UI.", file=sys.stderr, flush=True)
    with local_server(default_root() / "prefect"):
        return build_model(spec)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline_lib.demo import demo_spec

    spec = demo_spec(out_dir=args.out, evaluation=not args.no_eval)
    print(f"zhllama demo: building {spec.model} (synthetic Chinese-Alpaca-Plus: base + LLaMA-Plus LoRA + "
          f"Alpaca-Plus LoRA) → GGUF f16, {', '.join(spec.quant_types)}", flush=True)
    all_hits = False
    for n in range(2 if args.twice else 1):
        if n:
            print("\nsecond run (same inputs):", flush=True)
        result = _run_spec(spec, no_prefect=args.no_prefect)
        all_hits = _summary(result)
    report = Path(result.out_dir) / "report" / "report.md"
    if report.is_file():
        print(f"evaluation report: {report}")
    if not all_hits:
        print("run `zhllama demo` again: every stage is then a cache hit")
    return 0


def _read_spec(path: str) -> dict:
    """A BuildSpec JSON file, or the spec a build-lock.json records (the card's rebuild command)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the build spec {path} ({exc})", expected="a BuildSpec as JSON, or a "
                         "build-lock.json", fix="check the path") from None
    if isinstance(data, dict) and isinstance(data.get("spec"), dict) and "sources" in data:
        return data["spec"]  # a build lock: its spec, as the build was asked for
    if not isinstance(data, dict):
        raise InputError(f"the build spec {path} is a JSON {type(data).__name__}", expected="a JSON object")
    return data


def cmd_build(args: argparse.Namespace) -> int:
    base = _read_spec(args.spec) if args.spec else None
    spec = _spec_from(args.model, args, base=base)
    if args.plan:
        from pipeline_lib.pipeline import build_graph, format_graph, plan_build

        plan = plan_build(spec)
        print(format_graph(plan, build_graph(plan)))
        return 0
    _summary(_run_spec(spec, no_prefect=args.no_prefect))
    return 0


# ------------------------------------------------------------------ run a deployment


def deployment_name(text: str) -> str:
    """'alpaca-plus-7b' / 'build-alpaca-plus-7b' / 'check-upstream' / 'flow/dep' -> 'FLOW/DEPLOYMENT'.

    Prefect 3 wants FLOW/DEPLOYMENT (``prefect deployment run build-alpaca-plus-7b`` fails there);
    this accepts both forms."""
    if "/" in text:
        return text
    if text == "check-upstream":
        return "check-upstream/check-upstream"
    return f"build-model/{text if text.startswith('build-') else 'build-' + text}"


def _unknown_deployment(name: str, api: str) -> InputError:
    """No such deployment: say which model was meant when the name is close to a catalog one."""
    import difflib

    from pipeline_lib import catalog

    flow, _, dep = name.partition("/")
    model = dep.removeprefix("build-")
    choices = [*catalog.MODELS, "tiny-demo", "check-upstream"]
    close = difflib.get_close_matches(model, choices, n=3, cutoff=0.5)
    if model not in choices:
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return InputError(f"no model or deployment named {model!r}", expected="a catalog model (`zhllama catalog`)",
                          fix=f"{hint}e.g. `zhllama run alpaca-plus-7b`")
    return InputError(f"no deployment {name!r} on {api}",
                      fix="deploy them with `zhllama deploy` (or run `zhllama server`)")


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"{option} {item!r}", expected="KEY=JSON, e.g. spec={\"model\": \"alpaca-plus-7b\"}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile (`prefect config set ...`)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def failure_report(flow_run_id) -> list[str]:
    """Why a flow run failed, for the console: each failed task run's name and its error message."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    lines = []
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        for t in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time or 0):
            if t.state is not None and (t.state.is_failed() or t.state.is_crashed()):
                lines.append(f"  failed: {t.name}: {_message(t.state.message)}")
        if not lines and run.state is not None:
            lines.append(f"  {run.state.name}: {_message(run.state.message)}")
    return lines


def _message(text: str | None) -> str:
    """Prefect's state message without its wrapper ("Task run encountered an exception X: ...")."""
    text = (text or "").strip()
    for prefix in ("Task run encountered an exception ", "Flow run encountered an exception. ",
                   "Flow run encountered an exception "):
        text = text.removeprefix(prefix)
    return text.replace("\n", " ")


def cmd_run(args: argparse.Namespace) -> int:
    api = _api_url()
    if not api:
        raise InputError("no Prefect server to run a deployment on (PREFECT_API_URL is not set)",
                         fix="start one with `zhllama server` and export the PREFECT_API_URL it prints, "
                             "or build in this process with `zhllama build MODEL`")
    params = _key_values(args.param, "--param")
    job_variables = _key_values(args.job_variable, "--job-variable")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = deployment_name(args.deployment)
    try:
        run = run_deployment(name=name, parameters=params or None, job_variables=job_variables or None,
                             timeout=None if args.wait else 0)
    except ObjectNotFound:
        raise _unknown_deployment(name, api) from None
    except Exception as exc:
        import httpx

        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError)):
            raise ZhllamaError(f"cannot reach the Prefect server at {api} ({exc})",
                               fix="start it with `zhllama server`, or fix PREFECT_API_URL") from None
        if "not found" in str(exc).lower() or "404" in str(exc):
            raise _unknown_deployment(name, api) from None
        raise
    state = run.state.name if run.state else "Scheduled"
    print(f"flow run {run.name} ({run.id}) of {name}: {state}")
    if args.wait and not (run.state and run.state.is_completed()):
        for line in failure_report(run.id):
            print(line)
        return 1
    return 0
