"""``latentdub keys …``: the keys that sign content credentials (C2PA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from latentdub.cli._app import app, console

keys_app = typer.Typer(
    help="Signing keys for content credentials (C2PA): a local CA and signer certificate.",
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
