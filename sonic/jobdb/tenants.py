"""Tenants and their API keys. A key is shown once when it is made and stored only as its sha256 (keys are 256
random bits, so a fast hash is enough); the tenant's webhook signing secret is kept, since signing needs it."""

from __future__ import annotations

import base64
import hashlib
import secrets

from sqlalchemy import insert, select

from .db import JobDB, _unavailable
from .schema import api_keys, db_now, tenants

KEY_PREFIX = "sk_"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Tenants:
    def __init__(self, db: JobDB):
        self.db = db
        self.display = db.display

    @_unavailable
    def create_key(self, tenant: str) -> tuple[str, str]:
        """A new API key for `tenant` (made when new) -> (api key, the tenant's webhook secret)."""
        if not tenant or len(tenant) > 64 or not all(c.isalnum() or c in "-_." for c in tenant):
            raise ValueError(f"--tenant {tenant!r}: 1-64 letters, digits, '-', '_' or '.' (it names the tenant's "
                             "folders in the store)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.db.engine.begin() as connection:
            now = connection.execute(select(db_now())).scalar_one()
            row = connection.execute(select(tenants.c.id, tenants.c.webhook_secret).where(tenants.c.name == tenant)).first()
            if row is None:
                secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
                tenant_id = connection.execute(insert(tenants).values(name=tenant, webhook_secret=secret, created_at=now)
                                               .returning(tenants.c.id)).scalar_one()
            else:
                tenant_id, secret = row
            connection.execute(insert(api_keys).values(tenant_id=tenant_id, prefix=key[:10], key_hash=key_hash(key),
                                                       created_at=now))
        return key, secret

    @_unavailable
    def tenant_of(self, key: str) -> str | None:
        """The tenant a valid, unrevoked key belongs to, or None."""
        with self.db.reader.connect() as connection:
            return connection.execute(select(tenants.c.name).join(api_keys, api_keys.c.tenant_id == tenants.c.id)
                                      .where(api_keys.c.key_hash == key_hash(key),
                                             api_keys.c.revoked_at.is_(None))).scalar()
