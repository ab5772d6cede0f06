"""Running the gateway: the file layer, the gateway state and hypercorn's trio worker.

``appendfs s3 --meta META_URL --listen HOST:PORT`` ends here. The process holds one
:class:`~appendfs.fs.FileSystem` (a namespace session and store streams, like a mount
without FUSE) and serves the ASGI :class:`~appendfs.s3.app.App` with hypercorn (HTTP/1.1
keep-alive, ``Expect: 100-continue``, bounded header sizes, read timeouts). SIGTERM
stops accepting, lets requests in flight finish (bounded), and closes the session.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import h11
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve

from appendfs.fs import FileSystem, FsConfig
from appendfs.metrics import serve_metrics
from appendfs.s3.app import App
from appendfs.s3.config import S3Config
from appendfs.s3.gateway import open_gateway
from appendfs.store.client import ClientConfig

log = logging.getLogger(__name__)


def _give_100_continue_a_reason() -> None:
    """hypercorn answers ``Expect: 100-continue`` with ``HTTP/1.1 100 `` (h11's empty reason
    phrase). The botocore inside Debian 12's aws cli recognises the interim response only
    as ``100 <reason>``; without one it takes the interim response for the final one and the
    upload fails (BadStatusLine). RFC 9112 makes the reason optional, so this is their bug,
    but every S3 server sends ``100 Continue``: so do we. Idempotent."""
    if getattr(h11.Connection.send, "_appendfs_reason", False):
        return
    original = h11.Connection.send

    def send(self: h11.Connection, event: Any) -> bytes | None:
        if isinstance(event, h11.InformationalResponse) and not event.reason:
            event = h11.InformationalResponse(status_code=event.status_code, headers=event.headers,
                                              reason=b"Continue" if event.status_code == 100 else b"Informational")
        return original(self, event)

    send._appendfs_reason = True  # type: ignore[attr-defined]
    h11.Connection.send = send  # type: ignore[method-assign, assignment]


def hyper_config(cfg: S3Config) -> HyperConfig:
    hc = HyperConfig()
    hc.bind = [cfg.listen]
    hc.keep_alive_timeout = cfg.keep_alive_s
    hc.read_timeout = int(cfg.read_timeout_s)
    hc.graceful_timeout = 10.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("appendfs.s3.http")
    hc.include_server_header = False
    hc.backlog = 1024
    if cfg.tls_cert_file and cfg.tls_key_file:
        hc.certfile, hc.keyfile = cfg.tls_cert_file, cfg.tls_key_file
    return hc


async def serve(meta_url: str, cfg: S3Config, fcfg: FsConfig, ccfg: ClientConfig,
                ready: Callable[[list[str]], None] | None = None) -> None:
    _give_100_continue_a_reason()
    owner = f"s3:{os.uname().nodename}:{cfg.listen}"
    async with FileSystem.connect(meta_url, fcfg, ccfg, owner=owner) as fs, open_gateway(fs, cfg) as gw:
        serve_metrics(cfg.metrics, "appendfs_s3", lambda: {**gw.stats, **fs.stats(), **fs.client.stats})
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(_serve_http, App(gw), hyper_config(cfg))
            log.info("S3 gateway for %s serving %s", meta_url, ", ".join(binds))
            if ready is not None:
                ready(binds)


async def _serve_http(app: App, hc: HyperConfig, *, task_status: trio.TaskStatus[list[str]]) -> None:
    await hyper_serve(app, hc, task_status=task_status)  # type: ignore[arg-type]
