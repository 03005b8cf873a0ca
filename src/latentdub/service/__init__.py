"""The dubbing service's core: settings, the job database, API keys and signed webhooks.

* :mod:`.settings` — :class:`~.settings.ServiceSettings` (pydantic-settings, ``LATENTDUB_*``).
* :mod:`.db` / :mod:`.models` — SQLAlchemy 2 engine (SQLite with WAL, or PostgreSQL by URL),
  the ORM tables and :func:`~.db.migrate` (Alembic ``upgrade head``, configured in code).
* :mod:`.store` — :class:`~.store.JobStore`: the job life cycle with validated transitions,
  idempotency keys, keyset paging, progress from the engine's events and restart recovery.
* :mod:`.auth` — API keys: only a SHA-256 hash is stored; the plaintext is shown once.
* :mod:`.webhooks` — ``Webhook-Signature: t=…,v1=…`` (HMAC-SHA256) signing, verification and
  delivery with retries.

The HTTP app and the workers sit on top of these modules; nothing here imports them.
"""
