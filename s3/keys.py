"""Access-key administration behind ``appendfs s3 keys`` and ``appendfs up --s3``.

A key belongs to a tenant; the tenant owns buckets and decides the uid, gid and modes
of what its keys create (so files made through S3 have sensible owners on the mount).
Synchronous: called from the CLI and the ``up`` supervisor, never from the event loop.
"""

from __future__ import annotations

import json

from appendfs.errors import ConfigError
from appendfs.meta import Meta, S3Key


def _mode(text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        value = int(text, 8)
    except ValueError:
        raise ConfigError(f"mode {text!r} is not an octal number such as 0644") from None
    if not 0 <= value <= 0o7777:
        raise ConfigError(f"mode {text!r} is out of range (0000-7777)")
    return value


def create_key(meta: Meta, tenant: str, uid: int | None = None, gid: int | None = None,
               file_mode: str | None = None, dir_mode: str | None = None) -> S3Key:
    """A new key for ``tenant``; the tenant is created (or its settings changed) as given."""
    if not tenant or len(tenant) > 64 or not all(c.isalnum() or c in "-_." for c in tenant):
        raise ConfigError(f"tenant {tenant!r}: use 1-64 letters, digits, '-', '_' or '.'")
    current = meta.s3_tenant(tenant)
    changes = (uid, gid, file_mode, dir_mode)
    if current is None or any(v is not None for v in changes):
        meta.s3_tenant_set(
            tenant,
            uid if uid is not None else (current.uid if current else 0),
            gid if gid is not None else (current.gid if current else 0),
            _mode(file_mode, current.file_mode if current else 0o644),
            _mode(dir_mode, current.dir_mode if current else 0o755),
        )
    return meta.s3_key_create(tenant)


def render_keys(keys: list[S3Key], as_json: bool) -> str:
    rows = [{"access_key_id": k.access_key, "tenant": k.tenant.name, "uid": k.tenant.uid, "gid": k.tenant.gid,
             "file_mode": f"{k.tenant.file_mode:04o}", "dir_mode": f"{k.tenant.dir_mode:04o}",
             "created_ns": k.created_ns} for k in keys]
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return "no access keys (create one with `appendfs s3 keys create --meta META_URL`)"
    lines = [f"{'ACCESS KEY ID':22} {'TENANT':16} {'UID':>6} {'GID':>6} MODES"]
    for r in rows:
        lines.append(f"{r['access_key_id']:22} {r['tenant']:16} {r['uid']:>6} {r['gid']:>6} "
                     f"{r['file_mode']}/{r['dir_mode']}")
    return "\n".join(lines)
