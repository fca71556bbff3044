"""Rendering and signing cards in worker processes: what `cards build` and the update
pipeline share.

:class:`RenderConfig` is everything a worker process needs to build one program's
passes (picklable); :class:`RenderPool` keeps every core busy re-rendering the cards
an import changed, signing only the versions someone will fetch.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.wallet.builder import CardInput, PassBuilder
from app.wallet.certs import file_stamp, identity_password, load_identity
from app.wallet.images import ImageCache
from app.wallet.template import TemplateLibrary

if TYPE_CHECKING:
    from app.infra.models import AppleIdentity, Program
    from app.services import Services  # passed in by the entry point

BATCH_SIZE = 32  # cards per task handed to a worker process


@dataclass(frozen=True)
class RenderConfig:
    """What a worker process needs to build one program's passes (picklable)."""

    templates_path: str
    image_cache: str
    template: str
    certs_path: str
    certificate_file: str
    key_file: str | None
    password: bytes | None
    certificate_stamp: float  # a renewed certificate file makes a new builder

    @classmethod
    def for_program(cls, services: Services, program: Program,
                    identity: AppleIdentity) -> RenderConfig:
        settings = services.settings
        return cls(str(settings.templates_path), str(settings.instance_path / "image-cache"),
                   program.template, str(settings.certs_path), identity.certificate_file,
                   identity.key_file, identity_password(identity),
                   file_stamp(settings.certs_path, identity.certificate_file))

    def builder(self) -> PassBuilder:
        """Load the template and the signing identity, in the process that will sign."""
        templates = TemplateLibrary(Path(self.templates_path), ImageCache(Path(self.image_cache)))
        identity = load_identity(Path(self.certs_path), self.certificate_file, self.key_file,
                                 self.password)
        return PassBuilder(templates.get(self.template), identity.sign)


#: (card id, serial, input, content hash it has now, sign the new version if it changed)
RenderJob = tuple[int, str, CardInput, "str | None", bool]
#: (card id, content hash, pass.json, signature of its manifest, error)
Rendered = tuple[int, "str | None", "bytes | None", "bytes | None", "str | None"]

_render_builders: dict[RenderConfig, PassBuilder] = {}


def render_one(builder: PassBuilder, job: RenderJob) -> Rendered:
    """Render one card; sign it only when its content changed and someone will fetch it."""
    card_id, serial, card, previous_hash, sign = job
    try:
        pass_json = builder.pass_json(card)
    except ValueError as exc:  # template and data errors name the field
        return card_id, None, None, None, f"card {serial}: {exc}"
    content_hash = builder.content_hash(pass_json)
    if content_hash == previous_hash or not sign:
        return card_id, content_hash, None, None, None
    return card_id, content_hash, pass_json, builder.signer(builder.packager.manifest(pass_json)), None


def _render_batch(config: RenderConfig, jobs: list[RenderJob]) -> list[Rendered]:
    builder = _render_builders.get(config)
    if builder is None:
        builder = _render_builders[config] = config.builder()
    return [render_one(builder, job) for job in jobs]


class RenderPool:
    """Worker processes that render and sign changed cards for imports, started on first
    use (spawn: a forked copy of a threaded worker or open DB pool is unsafe) and kept
    for the whole import. ``render`` keeps every core busy on one batch of cards."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def render(self, config: RenderConfig, jobs: list[RenderJob]) -> list[Rendered]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        size = max(1, min(BATCH_SIZE, -(-len(jobs) // (self.workers * 2))))
        futures = [self._pool.submit(_render_batch, config, jobs[i:i + size])
                   for i in range(0, len(jobs), size)]
        return [result for future in futures for result in future.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
