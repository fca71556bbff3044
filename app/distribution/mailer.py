"""Sending one email over SMTP, configured by ``PASSERELLE_SMTP_URL``.

Plain ``smtplib``: a relay (the brand's own, or a provider's SMTP endpoint) does
the queueing, bounces and reputation; we hand it one message at a time and say
whether a failure is worth retrying.

- ``smtps://user:password@host:465``: TLS from the first byte;
- ``smtp://user:password@host:587``: STARTTLS, required (a server that does not
  offer it is an error, so a password never travels in clear);
- ``smtp://host:25?tls=none``: no TLS, for a relay on the same machine or network.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

TIMEOUT = 20.0  # seconds per SMTP command


class MailError(Exception):
    """Sending failed. ``permanent``: the server refused this message for good (5xx)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    implicit_tls: bool
    starttls: bool
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        """ValueError names what is wrong with the URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("the SMTP URL must look like smtp://user:password@host:587 "
                             "or smtps://user:password@host:465")
        options = parse_qs(parts.query)
        tls = options.get("tls", ["starttls" if parts.scheme == "smtp" else "implicit"])[0]
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError("tls= must be none, starttls or implicit")
        if parts.scheme == "smtps" and tls != "implicit":
            raise ValueError("smtps:// is TLS from the start; use smtp:// for tls=none/starttls")
        try:
            port = parts.port or (465 if parts.scheme == "smtps" else 587)
        except ValueError:
            raise ValueError("the SMTP port is not a number between 1 and 65535") from None
        return cls(host=parts.hostname, port=port, implicit_tls=parts.scheme == "smtps",
                   starttls=tls == "starttls",
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None)


def send(config: SmtpConfig, message: EmailMessage,
         tls_context: ssl.SSLContext | None = None) -> None:
    """Hand one message to the relay; MailError says what went wrong and whether to retry."""
    context = tls_context or ssl.create_default_context()
    try:
        if config.implicit_tls:
            client: smtplib.SMTP = smtplib.SMTP_SSL(config.host, config.port, timeout=TIMEOUT,
                                                    context=context)
        else:
            client = smtplib.SMTP(config.host, config.port, timeout=TIMEOUT)
        with client:
            if config.starttls:
                client.ehlo()
                if not client.has_extn("starttls"):
                    raise MailError("the SMTP server does not offer STARTTLS; use smtps:// "
                                    "or, for a local relay only, ?tls=none")
                client.starttls(context=context)
            if config.username:
                client.login(config.username, config.password or "")
            refused = client.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        raise MailError(f"recipient refused ({', '.join(map(str, codes))})",
                        permanent=all(code >= 500 for code in codes)) from None
    except smtplib.SMTPAuthenticationError as exc:
        raise MailError(f"SMTP login refused ({exc.smtp_code}); check PASSERELLE_SMTP_URL") from None
    except smtplib.SMTPResponseException as exc:
        raise MailError(f"SMTP error {exc.smtp_code}", permanent=exc.smtp_code >= 500) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise MailError(f"could not reach the SMTP server: {type(exc).__name__}") from None
    if refused:  # some recipients refused, others accepted; we only ever send to one
        raise MailError("recipient refused", permanent=True)
