"""A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps what it receives.

``script`` answers the next DATA commands, one entry each (``"451 ..."`` to ask
for a retry, ``"550 ..."`` to refuse); ``refuse_recipients`` answers RCPT with a
code. When the script is used up, messages are accepted.
"""

from __future__ import annotations

import socket
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


class _Handler:
    def __init__(self, standin: SmtpStandin) -> None:
        self.standin = standin

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if self.standin.refuse_recipients:
            return self.standin.refuse_recipients
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.standin.script:
            answer = self.standin.script.pop(0)
            self.standin.refused += 1
            return answer
        message = message_from_bytes(envelope.content, policy=policy.default)
        self.standin.received.append((list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 Message accepted"


class SmtpStandin:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], EmailMessage]] = []
        self.script: list[str] = []
        self.refused = 0
        self.refuse_recipients: str | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?tls=none"

    def __enter__(self) -> SmtpStandin:
        self.controller.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.controller.stop()
