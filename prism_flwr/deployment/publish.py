"""The publisher's step of app pinning: sign an app folder so that nodes trusting its key run it.

``sign_app_folder(app, key)`` builds the bundle as ``flwr build`` / ``flwr run`` do, writes
``app/app-signature.json`` (Ed25519 over ``pinning.signed_message`` of its manifest), rebuilds it
and checks that the signature is in the bundle and verifies. Returns the public key (hex, for the nodes'
``trusted-app-keys``) and the new bundle's SHA-256 (for ``trusted-apps``).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from prism_flwr.deployment.pinning import (
    KEYS_KEY,
    MANIFEST,
    SIGNATURE_FILE,
    AppNotTrusted,
    check_bundle,
    fab_identity,
    sign_app,
)


def _manifest(fab: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return z.read(MANIFEST).decode("utf-8")


def sign_app_folder(app: Path, private_key_pem: bytes) -> tuple[str, str]:
    """(public key hex, SHA-256 of the signed bundle); ValueError when the bundle would not verify."""
    from flwr.cli.build import build_fab_from_disk

    signature, public = sign_app(_manifest(build_fab_from_disk(app)), private_key_pem)
    (app / SIGNATURE_FILE).write_text(signature)
    fab = build_fab_from_disk(app)
    digest = hashlib.sha256(fab).hexdigest()
    try:
        check_bundle({KEYS_KEY: public}, fab, digest, *fab_identity(fab))
    except AppNotTrusted as err:
        raise ValueError(
            f"{app}: the signed bundle does not verify ({err}); is {SIGNATURE_FILE} ignored?"
        ) from None
    return public, digest
