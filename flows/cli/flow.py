"""``zhllama demo | build | run | server``: the build DAG from the command line and through Prefect.

* ``zhllama demo``    — the offline demo: tiny synthetic release → the whole build (through Prefect).
* ``zhllama build M`` — build one catalog model (through Prefect, or ``--no-prefect`` sequentially).
* ``zhllama run D``   — trigger a deployment on a running server, like
  ``prefect deployment run 'build-model/D'``.
* ``zhllama server``  — local Prefect server (SQLite, 127.0.0.1, analytics off) + all deployments
  + a process worker; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline_lib.errors import InputError, ZhllamaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo: build a tiny synthetic model end to end (Prefect flow)",
                       description="Build a tiny synthetic Chinese-Alpaca-Plus release into $ZHLLAMA_HOME/demo-source "
                       "and run the whole build on it: download (local), verify, tokenizer merge, LoRA merge, GGUF, "
                       "q4_0 + q8_0, evaluation. A second run is all cache hits.")
    p.add_argument("--out", help="publish the results here (default: $ZHLLAMA_HOME/builds/tiny-demo)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation stage")
    p.add_argument("--no-prefect", action="store_true", help="run the stages sequentially without Prefect")
    p.add_argument("--twice", action="store_true", help="run the build a second time to show the cache hits")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build", help="build one model of the catalog (download → … → evaluate)",
                       description="Build a catalog model (see `zhllama catalog`) or a custom chain "
                       "(--base and --lora). Runs the Prefect flow in this process.")
    p.add_argument("model", help="catalog name, e.g. alpaca-plus-7b; 'tiny-demo'; or a name for a custom build")
    p.add_argument("--spec", help="a BuildSpec as a JSON file (the other options override it)")
    p.add_argument("--base", help="base LLaMA source: hub repo, local folder, URL or archive")
    p.add_argument("--base-revision")
    p.add_argument("--lora", action="append", help="LoRA source, in merge order (repeat)")
    p.add_argument("--chinese-sp", help="chinese_sp.model source (for the tokenizer check)")
    p.add_argument("--output", action="append", choices=["hf", "pth", "gguf", "ggml"],
                   help="what to produce (repeat; default gguf)")
    p.add_argument("--quant", action="append", help="quantization type (repeat; default q4_0 and q8_0)")
    p.add_argument("--ggml-type", action="append", help="legacy GGML type (repeat; default q4_0)")
    p.add_argument("--outtype", choices=["f16", "f32", "bf16"])
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--out", help="publish the results here (default: $ZHLLAMA_HOME/builds/<model>)")
    p.add_argument("--no-prefect", action="store_true", help="run the stages sequentially without Prefect")
    p.add_argument("--plan", action="store_true", help="print the stage graph (sources, stages, inputs, outputs) "
                   "and exit without running anything")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="trigger a deployment on the Prefect server (like `prefect deployment run`)",
                       description="`zhllama run build-alpaca-plus-7b` = `prefect deployment run "
                       "'build-model/build-alpaca-plus-7b'`. Needs a server (`zhllama server`).")
    p.add_argument("deployment", help="build-<model>, <model>, check-upstream, or FLOW/DEPLOYMENT")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                   help="override a parameter, e.g. --param 'spec={\"model\":\"alpaca-plus-7b\",\"quant_types\":[\"q4_K_M\"]}'")
    p.add_argument("--job-variable", action="append", default=[], metavar="KEY=JSON",
                   help="work-pool job variable for this run, e.g. --job-variable 'env={\"ZHLLAMA_HOME\": \"/data/zh\"}'")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish and print its final state")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("server", help="local Prefect server + every deployment + a worker; Ctrl-C stops",
                       description="Start a Prefect server on 127.0.0.1 (SQLite in PREFECT_HOME, analytics off), "
                       "create the process work pool and the memory-heavy concurrency limit, deploy "
                       "deployments/prefect.yaml, start a worker, and print the UI address.")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--memory-slots", type=int, default=1,
                   help="memory-heavy stages (merge, GGUF, quantize, evaluate) allowed at once (default 1)")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker")
    p.set_defaults(func=cmd_server)


# ------------------------------------------------------------------ output


def _print_stages(result) -> None:
    """One line per stage of a BuildResult, then the cache summary and the output folder."""
    rows = result.stages
    width = max((len(r.label) for r in rows), default=10)
    for r in rows:
        how = "cache hit" if r.cached else "computed"
        extra = f"  ({r.state})" if r.state else ""
        print(f"  {r.label:<{width}}  {how:<9}  {r.key[:12]}{extra}")
    hits = sum(r.cached for r in rows)
    if rows and hits == len(rows):
        print(f"all {len(rows)} stages were cache hits: nothing was recomputed")
    else:
        print(f"{len(rows) - hits} of {len(rows)} stages computed, {hits} from the cache")
    print(f"outputs: {result.out_dir}")


def _spec_from(model: str, args: argparse.Namespace, *, base: dict | None = None):
    from pydantic import ValidationError

    from pipeline_lib.buildspec import BuildSpec

    data: dict[str, Any] = dict(base or {})
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
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid build spec: {problems}", fix="see `zhllama build --help`") from None


def _run_spec(spec, *, no_prefect: bool):
    """Run a build with the plain executor or through Prefect; both return a BuildResult."""
    if no_prefect:
        from pipeline_lib.pipeline import run_build

        return run_build(spec, on_stage=lambda s: print(f"  {s.label}: {'cache hit' if s.cached else 'computed'}"
                                                         f" ({s.seconds:.1f}s)", flush=True))
    if not _api_url():
        print("note: PREFECT_API_URL is not set, so Prefect starts a temporary local server for this run "
              "(10-20 s); `zhllama server` keeps one running with the UI.", file=sys.stderr, flush=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.build import build_model

    return build_model(spec)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline_lib.demo import demo_spec

    spec = demo_spec(out_dir=args.out, evaluation=not args.no_eval)
    print(f"zhllama demo: building {spec.model} (synthetic Chinese-Alpaca-Plus: base + LLaMA-Plus LoRA + "
          f"Alpaca-Plus LoRA) → GGUF f16, {', '.join(spec.quant_types)}", flush=True)
    for n in range(2 if args.twice else 1):
        if n:
            print("\nsecond run (same inputs):", flush=True)
        result = _run_spec(spec, no_prefect=args.no_prefect)
        _print_stages(result)
    report = Path(result.out_dir) / "report" / "report.md"
    if report.is_file():
        print(f"evaluation report: {report}")
    if not args.twice:
        print("run `zhllama demo` again: every stage is then a cache hit")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    base = json.loads(Path(args.spec).read_text(encoding="utf-8")) if args.spec else None
    spec = _spec_from(args.model, args, base=base)
    if args.plan:
        from pipeline_lib.pipeline import build_graph, format_graph, plan_build

        plan = plan_build(spec)
        print(format_graph(plan, build_graph(plan)))
        return 0
    _print_stages(_run_spec(spec, no_prefect=args.no_prefect))
    return 0


# ------------------------------------------------------------------ run


def deployment_name(text: str) -> str:
    """'alpaca-plus-7b' / 'build-alpaca-plus-7b' / 'check-upstream' / 'flow/dep' -> 'FLOW/DEPLOYMENT'."""
    if "/" in text:
        return text
    if text == "check-upstream":
        return "check-upstream/check-upstream"
    return f"build-model/{text if text.startswith('build-') else 'build-' + text}"


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


def cmd_run(args: argparse.Namespace) -> int:
    api = _api_url()
    if not api:
        raise InputError("no Prefect server to run a deployment on (PREFECT_API_URL is not set)",
                         fix="start one with `zhllama server` and export the PREFECT_API_URL it prints, "
                             "or build in this process with `zhllama build MODEL`")
    params = _key_values(args.param, "--param")
    job_variables = _key_values(args.job_variable, "--job-variable")
    from prefect.deployments import run_deployment

    name = deployment_name(args.deployment)
    try:
        run = run_deployment(name=name, parameters=params or None, job_variables=job_variables or None,
                             timeout=None if args.wait else 0)
    except Exception as exc:
        import httpx

        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError)):
            raise ZhllamaError(f"cannot reach the Prefect server at {api} ({exc})",
                               fix="start it with `zhllama server`, or fix PREFECT_API_URL") from None
        if "not found" in str(exc).lower() or "404" in str(exc):
            raise InputError(f"no deployment {name!r} on {api}",
                             fix="deploy them with `zhllama server` or `prefect deploy --all "
                                 "--prefect-file deployments/prefect.yaml`") from exc
        raise
    print(f"flow run {run.name} ({run.id}) of {name}: {run.state.name if run.state else 'Scheduled'}")
    if args.wait:
        return 0 if run.state and run.state.is_completed() else 1
    return 0


# ------------------------------------------------------------------ server


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ZhllamaError(f"the Prefect server exited with code {proc.returncode}",
                               fix="see its output above; is the port taken? try --port")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ZhllamaError(f"the Prefect server did not answer on {url} within {timeout:.0f}s")


def _prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    cmd = [str(exe) if exe.exists() else "prefect", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise ZhllamaError(f"`prefect {' '.join(args)}` failed:\n{(res.stdout + res.stderr)[-2000:]}")
    return res


def setup_server(env: dict[str, str], *, memory_slots: int = 1) -> None:
    """Work pool, concurrency limit, deployments: everything a fresh server needs (idempotent)."""
    from deployments import PREFECT_YAML
    from tasks.settings import MEMORY_LIMIT, WORK_POOL

    res = _prefect("work-pool", "inspect", WORK_POOL, env=env, check=False)
    if res.returncode != 0:
        _prefect("work-pool", "create", WORK_POOL, "--type", "process", env=env)
    _prefect("gcl", "create", MEMORY_LIMIT, "--limit", str(memory_slots), env=env, check=False)
    _prefect("deploy", "--all", "--no-prompt", "--prefect-file", str(PREFECT_YAML), env=env)


def _stop(proc: subprocess.Popen | None, what: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    print(f"stopping {what} …", flush=True)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def cmd_server(args: argparse.Namespace) -> int:
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PREFECT_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    exe = Path(sys.executable).with_name("prefect")
    prefect = str(exe) if exe.exists() else "prefect"
    server = worker = None

    def interrupt(signum, frame):  # Ctrl-C, and SIGTERM from a process manager: stop cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # explicit: a shell may start us with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupt)
    try:
        print(f"starting the Prefect server on {url} (SQLite in {env.get('PREFECT_HOME', '~/.prefect')}) …", flush=True)
        server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(args.port)],
                                  env=env, start_new_session=True)
        _wait_health(f"{url}/api", server)
        print("deploying deployments/prefect.yaml …", flush=True)
        setup_server(env, memory_slots=args.memory_slots)
        if not args.no_worker:
            from tasks.settings import WORK_POOL

            worker = subprocess.Popen([prefect, "worker", "start", "--pool", WORK_POOL], env=env,
                                      start_new_session=True)
        print(f"\nPrefect UI: {url}\n"
              f"in another shell:  export PREFECT_API_URL={url}/api\n"
              f"                   zhllama run build-tiny-demo      "
              f"(= prefect deployment run 'build-model/build-tiny-demo')\n"
              f"Ctrl-C stops the worker and the server.", flush=True)
        while server.poll() is None and (worker is None or worker.poll() is None):
            time.sleep(1)
        raise ZhllamaError("the Prefect " + ("server" if server.poll() is not None else "worker") + " stopped")
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(worker, "the worker")
        _stop(server, "the server")
