"""``latentdub keys …``: the keys that sign content credentials (C2PA), the secret watermark key and the service's API keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from latentdub.cli._app import app, console, console_err

keys_app = typer.Typer(
    help="Signing keys for content credentials (C2PA), and API keys of the dubbing service "
    "(create / list / revoke).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("init-signing")
def init_signing_cmd(
    dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Folder for the keys (default: the latentdub data folder's signing/)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace keys that already exist there.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Make a local CA and a signer certificate (EC P-256) for signing dubbed videos."""
    from latentdub.provenance.keys import CA_FILE, init_signing

    keys = init_signing(dir, force=force)
    info = keys.describe()
    info["ca"] = str(keys.chain_pem_path.with_name(CA_FILE))
    if json_out:
        print(json.dumps(info))
        return
    console.print(f"signing keys written to {keys.chain_pem_path.parent}", highlight=False, soft_wrap=True)
    console.print(f"  certificate chain  {info['chain']}", highlight=False, soft_wrap=True)
    console.print(f"  private key        {info['key']}  (keep it private: mode 0600)", highlight=False, soft_wrap=True)
    console.print(f"  CA certificate     {info['ca']}  (give it to verifiers to trust this signer)", highlight=False, soft_wrap=True)
    console.print(f"  signer             {info['subject']}, valid until {info['not_after'][:10]}", highlight=False, soft_wrap=True)


@keys_app.command("init-watermark")
def init_watermark_cmd(
    dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Data folder for watermark.key (default: the latentdub data folder; "
                     "a service: its --data-dir)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the key (marks made with the old one can no "
                                        "longer be read with this folder's key).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Make this deployment's secret watermark key (32 random bytes, mode 0600; the first dub makes one too)."""
    from latentdub.provenance.watermark_key import init_key, key_id

    path, key = init_key(dir, force=force)
    info = {"path": str(path), "key_id": key_id(key)}
    if json_out:
        print(json.dumps(info))
        return
    console.print(f"secret watermark key written to {path} (mode 0600; key id {info['key_id']})",
                  highlight=False, soft_wrap=True)
    console.print("  keep it private: whoever holds it can read, forge and remove this deployment's marks",
                  highlight=False, soft_wrap=True)


@keys_app.command("show")
def show_cmd(
    cert: Annotated[Path | None, typer.Option("--cert", help="Certificate chain (PEM); default: the default keys.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Private key (PEM) belonging to --cert.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check a signer (the default keys, made if missing, or --cert/--key) and say who it is."""
    from latentdub.provenance.keys import default_signing, load_signing

    created = False
    if cert is None and key is None:
        keys, created = default_signing()
    else:
        keys = load_signing(cert, key)
    info = {**keys.describe(), "created": created}
    if json_out:
        print(json.dumps(info))
        return
    if created:
        console.print(f"made new default signing keys in {keys.chain_pem_path.parent}", highlight=False, soft_wrap=True)
    for name in ("subject", "issuer", "not_after", "sha256_fingerprint", "chain", "key"):
        console.print(f"{name:<19}{info[name]}", highlight=False, soft_wrap=True)


# -- API keys of the HTTP service ---------------------------------------------------------------
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The service's folder (its database lives there); default: $LATENTDUB_SERVICE_DATA_DIR "
        "or the latentdub data folder's service/. $LATENTDUB_DATABASE_URL picks another database.",
    ),
]


def _service_engine(data_dir: Path | None):  # -> sqlalchemy Engine
    from latentdub.service.db import open_database
    from latentdub.service.settings import ServiceSettings

    settings = ServiceSettings(data_dir=data_dir) if data_dir is not None else ServiceSettings()
    if settings.is_sqlite:
        settings.ensure_data_dir()
    return open_database(settings.database_url)


@keys_app.command("create")
def create_cmd(
    name: Annotated[str, typer.Option("--name", help="A label for the key (who or what uses it).")] = "",
    allow_no_watermark: Annotated[
        bool,
        typer.Option(
            "--allow-no-watermark",
            help="Let this key's jobs turn the invisible watermark off (watermark=false). Without it they "
            "cannot: the C2PA credentials alone are stripped by a remux.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Make an API key for the service. It is printed once, as the last line; only its hash is kept."""
    from latentdub.service.auth import create_key

    engine = _service_engine(data_dir)
    try:
        plaintext, key = create_key(engine, name, allow_no_watermark=allow_no_watermark)
    finally:
        engine.dispose()
    label = f" {key.name!r}" if key.name else ""
    may = " Its jobs may turn the watermark off." if key.allow_no_watermark else ""
    console_err.print(
        f"created API key{label} (id {key.id}, prefix {key.prefix}).{may} Store it now: it cannot be shown again.",
        highlight=False,
        soft_wrap=True,
    )
    print(plaintext, flush=True)


@keys_app.command("list")
def list_cmd(
    data_dir: DataDirOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False,
) -> None:
    """List the service's API keys (prefix, name, created, revoked, may turn the watermark off; never the key)."""
    from latentdub.service.auth import list_keys

    engine = _service_engine(data_dir)
    try:
        rows = [key.to_dict() for key in list_keys(engine)]
    finally:
        engine.dispose()
    if json_out:
        print(json.dumps(rows))
        return
    if not rows:
        console.print("no API keys (make one with `latentdub keys create`)", highlight=False)
        return
    console.print(f"{'prefix':<10}{'name':<24}{'created':<22}{'revoked':<22}{'no-watermark':<14}id", highlight=False)
    for row in rows:
        console.print(
            f"{row['prefix']:<10}{(row['name'] or '-')[:23]:<24}{row['created_at'][:19]:<22}"
            f"{(row['revoked_at'] or '-')[:19]:<22}{'allowed' if row['allow_no_watermark'] else '-':<14}{row['id']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


@keys_app.command("revoke")
def revoke_cmd(
    id_or_prefix: Annotated[str, typer.Argument(help="The key's id or prefix (from `keys list`).")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    from latentdub.service.auth import revoke_key

    engine = _service_engine(data_dir)
    try:
        key = revoke_key(engine, id_or_prefix)
    finally:
        engine.dispose()
    console.print(
        f"revoked API key {key.prefix} ({key.name or 'no name'}, id {key.id}) at {key.revoked_at:%Y-%m-%d %H:%M:%S} UTC",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
