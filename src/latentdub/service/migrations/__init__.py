"""Alembic migrations of the service database (run by :func:`latentdub.service.db.migrate`)."""
