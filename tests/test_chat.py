"""Prompt templates, streaming generation, and `zhllama chat` / `zhllama generate` driven like a user would."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_lib import chat
from pipeline_lib.errors import InputError

REPO = Path(__file__).resolve().parents[1]
RELEASE_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n### Instruction:\n\n{instruction}\n\n### Response:\n\n")


def test_alpaca_template_is_the_release_one():
    t = chat.TEMPLATES["alpaca"]
    assert t.render([], "你好") == RELEASE_PROMPT.format(instruction="你好")
    two = t.render([("问题一", "回答一")], "问题二")
    # llama.cpp -ins: the first exchange stays in the context, the next instruction follows the reply
    assert two == RELEASE_PROMPT.format(instruction="问题一") + "回答一\n\n### Instruction:\n\n问题二\n\n### Response:\n\n"
    assert chat.TEMPLATES["plain"].render([], "从前有座山") == "从前有座山"
    with pytest.raises(InputError, match="unknown prompt template"):
        chat.get_template("vicuna")


def test_stop_filter_never_streams_a_stop_string():
    f = chat._StopFilter(["### Instruction:"])
    out = [f.feed(p) for p in ["答案是四。", "\n\n#", "## Instr", "uction:", "更多"]]
    assert "".join(out) == "答案是四。\n\n" and f.stopped
    g = chat._StopFilter(["### Instruction:"])
    assert g.feed("C# ") == "C# " and g.feed("##") == "" and g.flush() == "##"


def test_streaming_is_deterministic_and_joins_to_the_whole(eval_models):
    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=256)
    try:
        prompt = RELEASE_PROMPT.format(instruction="请介绍一下长城。")
        stats = chat.GenerationStats()
        pieces = list(chat.stream_generate(llm, prompt, max_tokens=12, stats=stats))
        text, stats2 = chat.generate(llm, prompt, max_tokens=12)
        assert "".join(pieces) == text == stats.text
        assert stats.prompt_tokens == len(llm.tokenize(prompt.encode(), add_bos=True))
        assert stats.completion_tokens <= 12 and stats.stop_reason in ("eos", "length", "stop")
        with pytest.raises(InputError, match="the context holds"):
            list(chat.stream_generate(llm, "长" * 400, max_tokens=4))
    finally:
        llm.close()


def test_history_that_does_not_fit_drops_the_oldest_turns(eval_models):
    t = chat.TEMPLATES["alpaca"]
    history = [("第一个问题是什么" * 3, "第一个回答" * 3), ("第二个问题", "第二个回答")]

    def n_tokens(llm, text):
        return len(llm.tokenize(text.encode(), add_bos=True))

    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=512)
    try:
        full = n_tokens(llm, t.render(history, "第三个问题"))
        last_only = n_tokens(llm, t.render(history[1:], "第三个问题"))
    finally:
        llm.close()
    max_tokens = 8
    n_ctx = last_only + max_tokens + 2  # room for the last turn only
    assert n_ctx < full + max_tokens
    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=n_ctx)
    try:
        s = chat.ChatSession(llm=llm, template=t, max_tokens=max_tokens, history=list(history))
        prompt = s.prompt_for("第三个问题")
        assert prompt == t.render(history[1:], "第三个问题")
        assert len(s.history) == 2  # the session keeps its history; only the prompt is trimmed
    finally:
        llm.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def test_generate_one_shot_matches_the_library(eval_models):
    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=256)
    try:
        expected, _ = chat.generate(llm, RELEASE_PROMPT.format(instruction="写一首诗。"), max_tokens=8,
                                    stop=chat.TEMPLATES["alpaca"].stop)
    finally:
        llm.close()
    res = subprocess.run(_cli("generate", str(eval_models.alpaca_f16), "写一首诗。", "-n", "8", "--ctx", "256",
                              "--show-prompt"), capture_output=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert res.stdout.decode("utf-8") == expected + "\n"
    assert RELEASE_PROMPT.format(instruction="写一首诗。") in res.stderr.decode("utf-8")
    # a LLaMA model continues the text as given
    res = subprocess.run(_cli("generate", str(eval_models.llama_f16), "Once upon a time", "-n", "4", "--ctx", "128",
                              "--show-prompt"), capture_output=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert "--- prompt ---\nOnce upon a time\n--- end prompt ---" in res.stderr.decode("utf-8")


class _Pty:
    """A child process on a pseudo-terminal, read with a deadline (no expect library needed)."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env,
                                     close_fds=True)
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; terminal so far:\n{self.text}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"chat exited ({self.proc.returncode}); terminal:\n{self.text}")
                self.raw += chunk
        return self.text

    def send(self, line: str) -> None:
        os.write(self.master, line.encode("utf-8"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


def test_chat_two_turns_through_a_pty(eval_models):
    q1, q2 = "你好，我叫小王。", "你还记得我的名字吗？"
    # what the model must answer, computed in-process with the same settings
    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=256)
    try:
        ref = chat.ChatSession(llm=llm, template=chat.TEMPLATES["alpaca"], sampling=chat.Sampling.greedy(),
                               max_tokens=6)
        reply1 = ref.reply(q1)
        reply2 = ref.reply(q2)
        second_prompt = ref.last_prompt
    finally:
        llm.close()
    assert reply1.strip() and reply2.strip(), "the tiny model must say something for this test to mean anything"
    assert q1 in second_prompt and reply1.strip() in second_prompt

    term = _Pty(_cli("chat", str(eval_models.alpaca_f16), "--ctx", "256", "--temp", "0", "--repeat-penalty", "1.0",
                     "-n", "6", "--show-prompt"))
    try:
        term.wait_for(lambda t: "template: alpaca" in t and t.endswith("> "))
        term.send(q1 + "\n")
        first = term.wait_for(lambda t: t.count("--- end prompt ---") == 1 and t.endswith("> "))
        assert reply1 + "\n" in first.split("--- end prompt ---", 1)[1]
        term.send(q2 + "\n")
        both = term.wait_for(lambda t: t.count("--- end prompt ---") == 2 and t.endswith("> "))
        shown = both.split("--- prompt ---\n")[2].split("\n--- end prompt ---")[0]
        assert shown == second_prompt  # the second turn carries the first turn's history
        assert reply2 + "\n" in both.rsplit("--- end prompt ---", 1)[1]
        term.send("\x04")  # Ctrl-D ends the chat
        deadline = time.monotonic() + 30
        while term.proc.poll() is None and time.monotonic() < deadline:
            select.select([term.master], [], [], 0.5)
            try:
                os.read(term.master, 65536)
            except OSError:
                break
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def _fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cores.items():
        topo = root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_smt_siblings_once_and_honours_the_cgroup_quota(tmp_path):
    # 2 packages x 2 cores x 2 hyperthreads = 8 logical CPUs, 4 physical cores
    layout = {cpu: (cpu // 4, (cpu // 2) % 2) for cpu in range(8)}
    sys_root = _fake_topology(tmp_path / "sys", layout)
    proc_root = tmp_path / "proc"
    (proc_root / "self").mkdir(parents=True)
    assert chat.physical_cores(sys_root=sys_root, proc_root=proc_root, cpus=range(8)) == 4
    assert chat.physical_cores(sys_root=sys_root, proc_root=proc_root, cpus=[0, 1]) == 1  # siblings of one core
    assert chat.physical_cores(sys_root=sys_root, proc_root=proc_root, cpus=[0, 2, 4]) == 3
    # a container limited to 1.5 CPUs by cgroup v2 gets 2 threads
    (proc_root / "self" / "cgroup").write_text("0::/box\n")
    (sys_root / "fs" / "cgroup" / "box").mkdir(parents=True)
    (sys_root / "fs" / "cgroup" / "box" / "cpu.max").write_text("150000 100000\n")
    assert chat.physical_cores(sys_root=sys_root, proc_root=proc_root, cpus=range(8)) == 2
    (sys_root / "fs" / "cgroup" / "box" / "cpu.max").write_text("max 100000\n")
    assert chat.physical_cores(sys_root=sys_root, proc_root=proc_root, cpus=range(8)) == 4
    # no topology at all: logical CPUs
    assert chat.physical_cores(sys_root=tmp_path / "empty", proc_root=tmp_path / "none", cpus=range(3)) == 3


def test_models_load_with_one_thread_per_physical_core(eval_models):
    n = chat.physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    llm = chat.load_model(eval_models.alpaca_q4_0, n_ctx=128, progress="load q4_0")
    try:
        # prompt batches and generation alike (llama-cpp-python's own default is cpu_count // 2 for generation)
        assert llm.n_threads == llm.n_threads_batch == n
        assert llm.context_params.n_threads == llm.context_params.n_threads_batch == n
    finally:
        llm.close()
    vocab = chat.load_vocab(eval_models.alpaca_q4_0)
    try:
        assert vocab.n_vocab() > 0 and vocab.tokenize("你好".encode(), add_bos=True)[0] == vocab.token_bos()
    finally:
        vocab.close()
