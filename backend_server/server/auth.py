"""CurveZMQ authentication: key files, and the ZAP handler that admits only authorised clients.

A keys folder served with `facerecon-backend serve --keys DIR` holds:

    DIR/server.key              the server's public key: hand this file to every artist
    DIR/server.key_secret       the server's secret key: never leaves the server
    DIR/authorized_clients/     one <name>.key (public) per artist allowed in

Each artist keeps their own <name>.key_secret; the add-on's preferences point at it and at server.key.
"""
from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER_NAME = "server"
AUTHORIZED_FOLDER = "authorized_clients"


def generate_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write <name>.key and <name>.key_secret (Z85 certificates) into folder; refuse to overwrite."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; delete it first to make a new key pair")
    zmq.auth.create_certificates(str(folder), name)
    secret.chmod(0o600)
    return public, secret


def load_server_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the server from keys_dir/server.key_secret."""
    path = keys_dir / f"{SERVER_NAME}.key_secret"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with: facerecon-backend keys generate "
                                f"--dir {keys_dir} --name {SERVER_NAME}")
    public, secret = zmq.auth.load_certificate(str(path))
    if not secret:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def start_authenticator(context: zmq.Context, keys_dir: Path) -> tuple[ThreadAuthenticator, int]:
    """Admit CURVE clients whose public key is in keys_dir/authorized_clients; returns (auth, count)."""
    authorized = keys_dir / AUTHORIZED_FOLDER
    if not authorized.is_dir():
        raise FileNotFoundError(f"{authorized} is missing; put each artist's <name>.key there")
    count = len(list(authorized.glob("*.key")))
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(authorized))
    return authenticator, count
