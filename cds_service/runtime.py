"""Per-app state built once by `create_app`, kept in `app.extensions["cds"]`.

gunicorn forks workers after importing nothing of ours (no preload), so each worker builds its
own runtime; the thread pool is still created lazily and re-created after a fork, because
threads do not survive one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flask import Flask, current_app

from cds_service.config import Site
from cds_service.registry import CdsService
from cds_service.store import Store, redacted_url


@dataclass
class CdsRuntime:
    services: Mapping[str, CdsService]
    sites: Mapping[str, Site]
    default_site: Site
    store: Store
    store_url_redacted: str
    fhir_max_workers: int = 16
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    _executor_pid: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def site_for_request(self) -> Site:
        """The site whose configuration applies to the current request.

        Until callers are authenticated there is one answering site (`DEFAULT_SITE`); with JWT
        verification the verified `iss` will select it.
        """
        return self.default_site

    @property
    def executor(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._executor is None or self._executor_pid != pid:
            with self._lock:
                if self._executor is None or self._executor_pid != pid:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.fhir_max_workers, thread_name_prefix="fhir"
                    )
                    self._executor_pid = pid
        return self._executor

    def close(self) -> None:
        if self._executor is not None and self._executor_pid == os.getpid():
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self.store.dispose()


def build_runtime(app: Flask, services: Mapping[str, CdsService], sites: Mapping[str, Site],
                  default_site: Site) -> CdsRuntime:
    url = app.config["DATABASE_URL"]
    rt = CdsRuntime(
        services=services,
        sites=sites,
        default_site=default_site,
        store=Store(url),
        store_url_redacted=redacted_url(url),
        fhir_max_workers=int(app.config["FHIR_MAX_WORKERS"]),
    )
    app.extensions["cds"] = rt
    return rt


def runtime() -> CdsRuntime:
    return current_app.extensions["cds"]
