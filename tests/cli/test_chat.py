"""`kiln chat`: one-shot answers, the interactive loop over piped input, /reset, /exit, Ctrl-C."""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest

from kiln.chat import ChatSession, chat_loop, run_chat
from kiln.cli import main
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def session(artifact):
    return ChatSession(LLM(artifact("llama"), num_kv_blocks=64), GREEDY)


def test_message_prints_one_answer(artifact, capsys):
    assert main(["chat", str(artifact("llama")), "--message", "hello", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.strip()


def test_second_turn_sees_the_first(session):
    session.reset()
    first = session.answer("my name is Ada", lambda s: None)
    prompt = session.template.render(session.messages + [{"role": "user", "content": "who am I?"}])
    assert first and first in prompt and "my name is Ada" in prompt
    second = session.answer("who am I?", lambda s: None)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[-1]["content"] == second
    # The same question without the first turn is a different prompt, so (greedy) a different
    # context: the second answer depends on the first turn.
    session.reset()
    assert session.messages == []
    alone = session.template.render([{"role": "user", "content": "who am I?"}])
    assert alone != prompt


def test_loop_over_piped_input_handles_reset_and_exit(session):
    calls: list[str] = []
    answer = session.answer
    session.answer = lambda text, write: calls.append(text) or answer(text, write)
    try:
        out = io.StringIO()
        chat_loop(session, io.StringIO("hello\n\nwhat did I say?\n/reset\nagain\n/nope\n/exit\nnever read\n"), out)
    finally:
        del session.answer
    assert calls == ["hello", "what did I say?", "again"]
    text = out.getvalue()
    assert "[conversation reset]" in text and "unknown command /nope" in text
    # after /reset only the last turn is remembered
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["again"]


def test_ctrl_c_stops_the_answer_and_keeps_the_session(session):
    session.reset()

    def interrupt(s: str) -> None:
        if s and s != " [stopped]":
            raise KeyboardInterrupt

    reply = session.answer("hello", interrupt)
    assert not session.llm.engine.has_unfinished_requests()
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    assert session.answer("still there?", lambda s: None)  # the next turn runs as usual


def test_run_chat_reads_stdin(artifact):
    out = io.StringIO()
    rc = run_chat(artifact("llama"), params=GREEDY, stdin=io.StringIO("hi\n"), stdout=out, num_kv_blocks=64)
    assert rc == 0 and out.getvalue().strip()


def test_console_script_with_piped_input(artifact):
    exe = shutil.which("kiln")
    if exe is None:
        pytest.skip("console scripts not installed")
    r = subprocess.run([exe, "chat", str(artifact("llama")), "--max-tokens", "4"], input="hi\n/reset\nyo\n/exit\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[conversation reset]" in r.stdout and "Traceback" not in r.stderr


def test_terminal_session_through_a_pty(artifact):
    """A real terminal: the help line, a prompt per turn, Ctrl-C at the prompt stays, /exit leaves."""
    pty = pytest.importorskip("pty")
    import os
    import select
    import time

    exe = shutil.which("kiln")
    if exe is None:
        pytest.skip("console scripts not installed")
    pid, fd = pty.fork()
    if pid == 0:  # the child: kiln chat on the pty
        try:
            os.execv(exe, [exe, "chat", str(artifact("llama")), "--max-tokens", "4"])
        finally:
            os._exit(127)
    seen = b""

    def until(text: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(text) == 0 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 4096)
        assert text in seen, seen
        seen = seen[seen.index(text) + len(text):]

    try:
        until(b"commands: /reset")
        until(b"> ")
        os.write(fd, b"hello\n")
        until(b"> ")
        os.write(fd, b"\x03")  # Ctrl-C at the prompt: a fresh prompt, not an exit
        until(b"> ")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        if pid:  # it failed before /exit: end the child this test started
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
