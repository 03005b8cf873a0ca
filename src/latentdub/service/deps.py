"""FastAPI dependencies of the routes: the settings, the job store, the runner and the caller's API key.

The pattern of the FastAPI full-stack template's ``backend/app/api/deps.py``
(https://github.com/fastapi/full-stack-fastapi-template): one small function per shared object and
an ``Annotated[..., Depends(...)]`` alias to declare it in a route, so routes name what they use
and tests can replace any of them with ``app.dependency_overrides``.

The objects themselves live on ``app.state`` (set once by :func:`~.app.create_app`). The API key
is checked by the app's gate middleware before the request body is read; it leaves the key's row
in the request's state, which :func:`current_api_key` hands on.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Depends, Request

from latentdub.options import DubOptions
from latentdub.service.models import ApiKey, Job
from latentdub.service.runner import Runner
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobNotFound, JobStore


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_runner(request: Request) -> Runner:
    return request.app.state.runner


def get_sync_timeout(request: Request) -> float:
    """How long ``/sync`` waits when the request does not say (``create_app(sync_timeout_s=…)``)."""
    return float(request.app.state.sync_timeout_s)


def get_options_model(settings: Annotated[ServiceSettings, Depends(get_settings)]) -> type[DubOptions]:
    return settings.options_model


async def form_field_names(request: Request) -> tuple[str, ...]:
    """The names of the form fields the request sent (FastAPI parsed the form already: this is
    its cached copy), so a route can refuse a field it does not declare instead of dropping it."""
    form = await request.form()
    return tuple(dict.fromkeys(form.keys()))


def current_api_key(request: Request) -> ApiKey | None:
    """The caller's key (None when auth is off)."""
    return getattr(request.state, "api_key", None)


def current_key_id(key: Annotated[ApiKey | None, Depends(current_api_key)]) -> str | None:
    """The caller's key id: what owns its jobs and assets (None when auth is off)."""
    return None if key is None else key.id


async def owned_job(
    job_id: str,
    store: Annotated[JobStore, Depends(get_store)],
    key_id: Annotated[str | None, Depends(current_key_id)],
) -> Job:
    """The job ``job_id`` of the caller's key; another key's job is a 404, as if it did not exist."""
    job = await anyio.to_thread.run_sync(store.get, job_id)  # JobNotFound → 404
    if not visible_to(key_id, job.api_key_id):
        raise JobNotFound(job_id)
    return job


def visible_to(key_id: str | None, owner_id: str | None) -> bool:
    """May the caller ``key_id`` (None: auth is off) see a job or asset owned by ``owner_id``?

    With auth on, only its own: an owner-less row (made while the server ran ``--no-auth``, or
    whose key was deleted) belongs to no key, so no key may read, use or delete it.
    """
    return key_id is None or owner_id == key_id


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
OptionsModelDep = Annotated[type[DubOptions], Depends(get_options_model)]
ApiKeyDep = Annotated[ApiKey | None, Depends(current_api_key)]
KeyIdDep = Annotated[str | None, Depends(current_key_id)]
SyncTimeoutDep = Annotated[float, Depends(get_sync_timeout)]
JobDep = Annotated[Job, Depends(owned_job)]
FormFieldsDep = Annotated[tuple[str, ...], Depends(form_field_names)]
