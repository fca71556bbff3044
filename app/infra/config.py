"""Settings, read from environment variables prefixed ``PASSERELLE_``.

Every setting has a documented default so that a fresh clone runs with no
configuration at all (SQLite under the instance folder, development
certificates, a demo tenant). Production deployments override them.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

PREFIX = "PASSERELLE_"
#: The checkout's root. Only meaningful in a checkout (editable install, tests): an
#: installed wheel has no repository around it, so no runtime default may use it.
REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped(name: str) -> Path:
    """A folder Passerelle ships beside its code: ``migrations`` or ``pass_templates``.

    A checkout keeps them at the repository root, where people look for them. A wheel
    has no root to put them in, so setup.py copies them into the package as
    ``app/_migrations`` and ``app/_pass_templates``; this resolves either.
    """
    packaged = resources.files("app") / f"_{name}"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return REPO_ROOT / name


def _default_instance() -> Path:
    # The folder `passerelle` runs in, as README says, wherever the code is installed.
    return Path.cwd() / "instance"


def _as_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {raw!r} (use true/false)")


@dataclass
class Settings:
    """All runtime settings. Field docs are the reference for README's table."""

    #: Folder for the SQLite database, the secret key file and derived caches.
    instance_path: Path = field(default_factory=_default_instance)
    #: SQLAlchemy URL. ``postgresql://`` is accepted and mapped to psycopg 3.
    database_url: str = ""
    #: Base URL written into passes (webServiceURL) and links. No trailing slash.
    public_url: str = "http://127.0.0.1:8000"
    #: Where pass templates live (one folder per template).
    #: Default: the templates shipped with Passerelle (pass_templates/ in a checkout).
    templates_path: Path = field(default_factory=lambda: shipped("pass_templates"))
    #: Pass-type certificates and WWDR intermediates (see certs.example/README.md).
    certs_path: Path = field(default_factory=lambda: _default_instance() / "certs")
    #: Flask session/CSRF key. Generated once into the instance folder when unset.
    secret_key: str = ""
    #: Demo mode: seeds nothing by itself, but turns on the /demo page.
    demo: bool = False
    #: Warn when a pass certificate expires within this many days.
    cert_warn_days: int = 30
    #: Refuse to start when certificates fail their checks (false only for tests).
    strict_certs: bool = True
    #: APNs base URL. Wallet pushes only work in production; change it only for stand-ins.
    apns_url: str = "https://api.push.apple.com"
    #: Extra CA file to trust for APNs (a staging or test stand-in); empty = system trust.
    apns_ca_file: str = ""
    #: Google Wallet REST API base (a stand-in in tests); OAuth token URL comes from
    #: each service-account JSON's token_uri.
    google_api_url: str = "https://walletobjects.googleapis.com"
    #: Google's callback root signing keys.
    google_keys_url: str = "https://pay.google.com/gp/m/issuer/keys"
    #: Optional JSON file with Google's root keys, used when the URL cannot be reached.
    google_keys_file: str = ""
    #: Redis URL for the job queue; empty = the embedded SQLite queue in the instance folder.
    redis_url: str = ""
    #: Where email goes out: ``smtp://user:password@host:587`` (STARTTLS required),
    #: ``smtps://...:465`` (TLS from the start), ``smtp://host:25?tls=none`` (a local
    #: relay only). Empty: no email; members who ask for their card again get nothing.
    smtp_url: str = ""
    #: The From of those emails, e.g. ``Rewards <cards@brand.example>``.
    mail_from: str = ""
    #: Reverse proxies in front of Passerelle (a load balancer, nginx...): their
    #: X-Forwarded-For/-Proto/-Host are trusted, so rate limits count each client and
    #: not the proxy. 0 = none: those headers are ignored (anyone could forge them).
    trusted_proxies: int = 0
    #: Let webhook subscriptions reach loopback, private and link-local addresses (a
    #: receiver on your LAN, local development). Off: only public addresses are called.
    webhook_allow_private_networks: bool = False
    #: Log lines as ``text`` (for people) or ``json`` (one object per line, for log
    #: pipelines). Either way: a request id and the tenant, no emails, names or tokens.
    log_format: str = "text"
    #: Log level of ``serve``, ``up`` and ``worker``: DEBUG, INFO, WARNING, ERROR.
    log_level: str = "INFO"
    #: Bearer token for /metrics. Empty: /metrics answers loopback clients only.
    metrics_token: str = ""
    #: Days to keep logs and finished outbox rows, per table, over the defaults in
    #: app/retention.py: ``push_attempts=14,funnel_events=0`` (0 = keep forever).
    retention: str = ""
    #: Seconds a worker holds a push job it took. If the worker dies, another one takes
    #: the job over once this has passed (the sweeper looks every minute). It must be
    #: longer than one delivery takes (APNs answers within seconds); shorter means a
    #: crashed worker's pushes go out sooner.
    push_lease_seconds: int = 120
    #: On SIGTERM a worker stops taking jobs and lets running ones finish for this
    #: long; push jobs still in flight then are handed back at once (not left to their
    #: lease). Keep it under your supervisor's stop timeout (systemd 90 s, compose 10 s
    #: unless ``stop_grace_period`` says more).
    worker_shutdown_seconds: int = 20

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}  # each parsed to its field's type above
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.type in ("Path",):
                values[f.name] = Path(raw)
            elif f.type == "bool":
                values[f.name] = _as_bool(raw)
            elif f.type == "int":
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        values.update(overrides)
        settings = cls(**values)
        settings._fill_derived_defaults(instance_overridden="instance_path" in values,
                                        certs_overridden="certs_path" in values)
        return settings

    def _fill_derived_defaults(self, *, instance_overridden: bool, certs_overridden: bool) -> None:
        self.instance_path = Path(self.instance_path)
        self.templates_path = Path(self.templates_path)
        if instance_overridden and not certs_overridden:
            self.certs_path = self.instance_path / "certs"
        self.certs_path = Path(self.certs_path)
        if not self.database_url:
            self.database_url = f"sqlite:///{self.instance_path / 'passerelle.sqlite3'}"
        self.database_url = normalize_database_url(self.database_url)
        self.public_url = self.public_url.rstrip("/")

    def ensure_secret_key(self) -> str:
        """Return the secret key, creating a random one in the instance folder if needed."""
        if self.secret_key:
            return self.secret_key
        path = self.instance_path / "secret_key"
        if path.exists():
            self.secret_key = path.read_text().strip()
        else:
            self.instance_path.mkdir(parents=True, exist_ok=True)
            self.secret_key = secrets.token_urlsafe(48)
            path.write_text(self.secret_key)
            path.chmod(0o600)
        return self.secret_key


def normalize_database_url(url: str) -> str:
    """Map driver-less PostgreSQL URLs to psycopg 3, the driver we ship."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url
