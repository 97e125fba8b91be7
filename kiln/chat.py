"""`kiln chat ARTIFACT`: a terminal chat over the offline engine with the model's chat template.

Each turn renders the whole conversation with the artifact's chat template (as the server does),
encodes it without adding special tokens (the template wrote them) and streams the answer.
`/reset` forgets the conversation, `/exit` (or end of input) leaves, Ctrl-C stops the answer being
generated and keeps what was said so far. `--message` asks one question and exits.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from kiln.errors import KilnError
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server.chat_template import ChatTemplate

HELP = "commands: /reset (forget the conversation), /exit (leave); Ctrl-C stops an answer"


@contextmanager
def _sigint_sets(flag: threading.Event) -> Iterator[None]:
    """While inside, Ctrl-C sets `flag` instead of raising wherever the engine happens to be:
    the answer then stops between two steps, leaving the engine consistent."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """A conversation with one artifact: the history and how to answer the next message."""

    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None):
        tok = llm.get_tokenizer()
        if tok.chat_template is None:
            raise KilnError(
                "the artifact's tokenizer has no chat template, so it cannot chat; "
                "use `kiln generate ARTIFACT --prompt ...` for plain completion"
            )
        self.llm = llm
        self.params = params
        self.system = system
        self.template = ChatTemplate(tok.chat_template, tok.config)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str, write: Callable[[str], object]) -> str:
        """Add the user's message, stream the answer through `write`, keep it in the history.
        A KeyboardInterrupt stops the generation; what was generated so far is kept."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.template.render(self.messages, add_generation_prompt=True)
        ids = self.llm.get_tokenizer().encode(prompt, add_special_tokens=False)
        reply, request_id, stop = "", None, threading.Event()
        try:
            with _sigint_sets(stop):
                for out in self.llm.generate_stream({"prompt_token_ids": ids}, self.params):
                    request_id = out.request_id
                    reply += out.outputs[0].delta_text
                    write(out.outputs[0].delta_text)
                    if stop.is_set():
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if request_id is not None:
                self.llm.engine.abort_request(request_id)
            while self.llm.engine.has_unfinished_requests():  # drop what the abort left queued
                self.llm.engine.step()
            write(" [stopped]")
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    """Read messages line by line until /exit or end of input, answering each."""

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    interactive = stdin.isatty()
    if interactive:
        write(f"{HELP}\n")
    while True:
        try:
            # input() gives line editing on a terminal; it reads sys.stdin, so only there.
            line = input("> ") + "\n" if interactive and stdin is sys.stdin else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            write("\n")
            continue
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            write("[conversation reset]\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text}; {HELP}\n")
            continue
        session.answer(text, write)
        write("\n")


def run_chat(artifact: str | Path, message: str | None = None, system: str | None = None,
             params: SamplingParams | None = None, stdin: TextIO | None = None,
             stdout: TextIO | None = None, **engine_kwargs) -> int:
    """`kiln chat`: one answer to `message`, or an interactive loop over stdin."""
    out = stdout or sys.stdout
    llm = LLM(artifact, **engine_kwargs)
    session = ChatSession(llm, params or SamplingParams(temperature=0.0, max_tokens=256), system)
    if message is not None:
        session.answer(message, lambda s: (out.write(s), out.flush()))
        out.write("\n")
        return 0
    chat_loop(session, stdin or sys.stdin, out)
    return 0
