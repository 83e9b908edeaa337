"""Run the real ``zhllama`` command line in child processes, optionally SIGKILLed at a kill point.

Each run is ``flows.cli.main.main(argv)`` in a fresh child process with its own environment, its
stdout/stderr in files, and ``ZHLLAMA_KILL_AT`` set for a kill run (see pipeline_lib/killpoints.py).
Importing torch costs ~3 s per process on this machine, more than the tiny stages themselves, so by
default the children are forked from a "zygote": a Python process that imported the project once
and forks one child per run (nothing has run in it: no thread pool, no open model). Set
``ZHLLAMA_CRASH_SUBPROCESS=1`` to start every run as a new ``python -m flows.cli`` instead (slower,
same assertions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The zygote: imports everything a stage needs, then forks one child per request line on stdin.
ZYGOTE = r"""
import json, os, signal, sys, traceback
import torch, numpy, safetensors.torch, gguf, llama_cpp, huggingface_hub  # noqa: F401  (the slow imports)
import flows.cli.main
for m in ("cache", "convert", "download", "merge", "quantize", "tokenizer", "evaluate"):
    __import__("flows.cli." + m)
import pipeline_lib.merge, pipeline_lib.gguf_export, pipeline_lib.quantize, pipeline_lib.download  # noqa: E401,F401
import pipeline_lib.store, pipeline_lib.ggml_legacy  # noqa: E401,F401
reply = os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDONLY)
print(json.dumps({"ready": os.getpid()}), file=reply)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(devnull, 0); os.dup2(out, 1); os.dup2(err, 2)
            os.environ.clear(); os.environ.update(req["env"])
            os.chdir(req["cwd"])
            sys.argv = ["zhllama", *req["argv"]]
            if req.get("code"):
                exec(compile(req["code"], "<crash-test>", "exec"), {"__name__": "__main__", "ARGV": req["argv"]})
                rc = 0
            else:
                rc = flows.cli.main.main(req["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(int(rc or 0))
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"rc": rc}), file=reply)
"""

# the same, one fresh interpreter per run
RUNNER = r"""
import os, sys
if os.environ.get("ZHLLAMA_CRASH_CODE"):
    ARGV = sys.argv[1:]
    exec(compile(os.environ["ZHLLAMA_CRASH_CODE"], "<crash-test>", "exec"), {"__name__": "__main__", "ARGV": ARGV})
else:
    from flows.cli.main import main
    sys.exit(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    rc: int  # negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.rc == -9


def base_env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PYTHONPATH=str(REPO), ZHLLAMA_PROGRESS="0", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
               HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class Runner:
    """Runs CLI command lines in children (forked from a zygote unless ZHLLAMA_CRASH_SUBPROCESS=1)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.subprocess = os.environ.get("ZHLLAMA_CRASH_SUBPROCESS") == "1"
        self._zygote: subprocess.Popen | None = None
        self._n = 0
        self.runs: list[Run] = []

    def _start(self) -> subprocess.Popen:
        if self._zygote is None:
            self._zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=base_env(), cwd=self.workdir)
            ready = self._zygote.stdout.readline()
            if not ready:
                raise RuntimeError("the crash-test zygote did not start")
        return self._zygote

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.stdin.close()
            self._zygote.wait(timeout=30)
            self._zygote = None

    def run(self, argv: list[str], *, env: dict[str, str], kill_at: str | None = None, code: str | None = None,
            timeout: float = 300) -> Run:
        """One run of ``zhllama argv`` (or of the Python ``code``, given ``ARGV``) with ``env``."""
        self._n += 1
        full_env = base_env(**env)
        if kill_at:
            full_env["ZHLLAMA_KILL_AT"] = kill_at
        out, err = self.workdir / f"run{self._n}.out", self.workdir / f"run{self._n}.err"
        t0 = time.perf_counter()
        if self.subprocess:
            if code:
                full_env["ZHLLAMA_CRASH_CODE"] = code
            proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], env=full_env, cwd=self.workdir,
                                  stdout=open(out, "w"), stderr=open(err, "w"), timeout=timeout)
            rc = proc.returncode
        else:
            z = self._start()
            z.stdin.write(json.dumps({"argv": list(argv), "env": full_env, "cwd": str(self.workdir), "code": code,
                                      "stdout": str(out), "stderr": str(err)}) + "\n")
            z.stdin.flush()
            line = z.stdout.readline()
            if not line:
                raise RuntimeError("the crash-test zygote died")
            rc = json.loads(line)["rc"]
        run = Run(tuple(argv), rc, out.read_text(errors="replace"), err.read_text(errors="replace"),
                  time.perf_counter() - t0)
        self.runs.append(run)
        return run
