"""The production HTTP server behind `passerelle serve`: gunicorn with gthread workers.

Chosen from measurements (benchmarks/README.md, `update_storm.py`): Wallet devices
keep their connections open, and after a push thousands of them ask at once. Each
gthread worker process multiplexes up to ``worker_connections`` keep-alive
connections over a pool of threads, so 1,000 concurrent devices are held without
refusals, and several processes use every core (one Python process is bound by
one core). gunicorn's sync workers close the connection after every request;
waitress serves all connections from one process.

Each worker builds its own application (and database pool) after the fork. The
X-Forwarded-* headers are left to ``create_app``'s ProxyFix, which trusts only
``PASSERELLE_TRUSTED_PROXIES`` hops: gunicorn's own scheme-header handling is off.
On platforms without gunicorn (Windows) waitress serves instead.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

#: Threads per worker process. Below the database pool's 15 connections per process.
THREADS = 8
#: Open connections one worker process holds (idle keep-alive ones included).
WORKER_CONNECTIONS = 1000
#: Seconds an idle keep-alive connection stays open (above Wallet's pause between its
#: serials request and its pass download, below a load balancer's usual 60-75 s).
KEEPALIVE = 75


def default_workers() -> int:
    """One worker process per core, at least two (a stalled one never stops the site)."""
    return max(2, os.cpu_count() or 1)


def options(host: str, port: int, workers: int, threads: int) -> dict[str, Any]:
    return {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "worker_connections": WORKER_CONNECTIONS,
        "keepalive": KEEPALIVE,
        "backlog": 2048,
        "secure_scheme_headers": {},  # X-Forwarded-*: PASSERELLE_TRUSTED_PROXIES decides
        "accesslog": None,  # URLs carry serials and device ids: no access log by default
        "errorlog": "-",
        "loglevel": "info",
    }


def _forget_metrics_of(_server: Any, worker: Any) -> None:
    """A server process exited: its live gauges leave /metrics (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def serve(host: str, port: int, workers: int, threads: int) -> None:
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:  # no fork (Windows): one process, waitress
        from waitress import serve as waitress_serve

        from app import create_app  # app → cli → server: the package is complete only once it runs

        waitress_serve(create_app(), host=host, port=port, threads=threads)
        return

    class Server(BaseApplication):
        def load_config(self) -> None:
            for name, value in options(host, port, workers, threads).items():
                self.cfg.set(name, value)
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                self.cfg.set("child_exit", _forget_metrics_of)

        # types-gunicorn types a WSGI app's environ as MutableMapping, typeshed (and
        # Flask) as dict: the same app, two spellings.
        def load(self) -> Flask:  # type: ignore[override]
            from app import create_app

            return create_app()

    Server().run()
