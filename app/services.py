"""The long-lived parts of a running Passerelle, shared by web, commands and workers.

One :class:`Services` per process: the database, the template library (with
its derived images) and the loaded signing identities, each built once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from app.infra.config import Settings
from app.infra.db import (
    CRM_DISPATCH_KEY,
    IMPORT_DISPATCH_KEY,
    MAIL_DISPATCH_KEY,
    PUSH_DISPATCH_KEY,
    WEBHOOK_DISPATCH_KEY,
    Database,
)
from app.infra.models import AppleIdentity, Program
from app.jobs import JobQueue
from app.tracking.google_callbacks import RootKeyStore, parse_root_keys
from app.updates.apns import ApnsTokenKey
from app.updates.google_client import GoogleWalletClient
from app.updates.google_wallet import service_account_info
from app.wallet import certs
from app.wallet.builder import PassBuilder
from app.wallet.images import ImageCache
from app.wallet.template import TemplateLibrary
from app.webhooks import outbound as webhooks_out

if TYPE_CHECKING:
    from flask import Flask

    from app.infra.models import Tenant
    from app.tracking.google_callbacks import RootKeyStore
    from app.updates.apns import ApnsClient, ApnsPool
    from app.updates.google_client import GoogleClientOptions, GoogleWalletClient


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.templates = TemplateLibrary(
            settings.templates_path, ImageCache(settings.instance_path / "image-cache")
        )
        self._identities: dict[tuple[str, float], certs.SigningIdentity] = {}
        self._builders: dict[tuple[str, str, float], PassBuilder] = {}
        self._apns: ApnsPool | None = None
        self._google_clients: dict[tuple[object, ...], GoogleWalletClient] = {}
        self._google_keys: RootKeyStore | None = None
        # Extra GoogleWalletClient arguments (retry policy), e.g. {"max_retries": 2}.
        self.google_client_options: GoogleClientOptions = {}
        self.jobs = JobQueue(settings, lambda: self)
        # What happens after a commit, put together here for web, worker and commands:
        # committed outbox rows go to the job queue at once ...
        self.db.dispatchers.update({
            PUSH_DISPATCH_KEY: self.jobs.dispatch,
            WEBHOOK_DISPATCH_KEY: self.jobs.dispatch_webhooks,
            CRM_DISPATCH_KEY: self.jobs.dispatch_crm,
            MAIL_DISPATCH_KEY: self.jobs.dispatch_mail,
            IMPORT_DISPATCH_KEY: self.jobs.dispatch_imports,
        })
        # ... and customer changes become customer.updated / consent.changed webhooks.
        webhooks_out.install(self.db)

    @property
    def apns(self) -> ApnsPool:
        """APNs connections, one per pass type, opened on first use and kept."""
        if self._apns is None:
            from app.updates.apns import ApnsPool  # the HTTP/2 stack loads only where pushes run

            ca_file = Path(self.settings.apns_ca_file) if self.settings.apns_ca_file else None
            self._apns = ApnsPool(self.settings.apns_url, ca_file=ca_file)
        return self._apns

    def apns_client(self, identity: AppleIdentity) -> ApnsClient:
        """The APNs client for a pass type: its .p8 token key if one is registered,
        else the pass certificate itself (Apple's documented way)."""

        token_key = None
        if identity.apns_key_file and identity.apns_key_id:
            token_key = ApnsTokenKey.from_file(
                Path(self.settings.certs_path) / identity.apns_key_file, identity.apns_key_id,
                identity.team_identifier)
        return self.apns.client(identity.pass_type_identifier, self.signing_identity(identity),
                                token_key)

    def google_client(self, tenant: Tenant) -> GoogleWalletClient:
        """The tenant's Google Wallet REST client (one per service-account file version)."""

        info = service_account_info(self, tenant)
        key = (tenant.id, info.get("private_key_id"), info.get("client_email"))
        if key not in self._google_clients:
            self._google_clients[key] = GoogleWalletClient(
                info, self.settings.google_api_url, **self.google_client_options)
        return self._google_clients[key]

    @property
    def google_root_keys(self) -> RootKeyStore:
        """Google's callback root keys, fetched and cached per Cache-Control."""
        if self._google_keys is None:

            preloaded = None
            if self.settings.google_keys_file:
                preloaded = parse_root_keys(json.loads(
                    Path(self.settings.google_keys_file).read_text()))
            self._google_keys = RootKeyStore(self.settings.google_keys_url, preloaded=preloaded)
        return self._google_keys

    def close(self) -> None:
        if self._apns is not None:
            self._apns.close()
        self.db.dispose()

    @property
    def web_service_url(self) -> str:
        return f"{self.settings.public_url}/passkit"

    def signing_identity(self, identity: AppleIdentity) -> certs.SigningIdentity:
        """Load (once per certificate file version) the key and chain for a pass type."""
        stamp = certs.file_stamp(self.settings.certs_path, identity.certificate_file)
        key = (identity.pass_type_identifier, stamp)
        if key not in self._identities:
            self._identities[key] = certs.load_identity(
                self.settings.certs_path, identity.certificate_file, identity.key_file,
                certs.identity_password(identity),
            )
        return self._identities[key]

    def pass_builder(self, program: Program, identity: AppleIdentity) -> PassBuilder:
        stamp = certs.file_stamp(self.settings.certs_path, identity.certificate_file)
        key = (program.template, identity.pass_type_identifier, stamp)
        if key not in self._builders:
            template = self.templates.get(program.template)
            self._builders[key] = PassBuilder(template, self.signing_identity(identity).sign)
        return self._builders[key]


def services_of(app: Flask) -> Services:
    """The Services a Flask app was created with (``create_app`` stores them)."""
    services: Services = app.extensions["passerelle"]
    return services
