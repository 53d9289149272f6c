"""CurveZMQ authentication: key files, and the ZAP handler that admits only authorised clients.

A keys folder served with `facerecon-backend serve --keys DIR` holds:

    DIR/server.key              the server's public key: hand this file to every artist
    DIR/server.key_secret       the server's secret key: never leaves the server
    DIR/authorized_clients/     one <name>.key (public) per artist allowed in

Each artist keeps their own <name>.key_secret; the add-on's preferences point at it and at server.key.
"""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER_NAME = "server"
AUTHORIZED_FOLDER = "authorized_clients"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # a plain file name: no folders, no '..'


def check_key_name(name: str) -> str:
    """`name` if it is a plain name (letters, digits, '.', '_', '-'; 1 to 64; not starting with
    '.' or '-'), else ValueError: a key pair is always written inside its keys folder."""
    if not KEY_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a plain name for a key pair: use 1 to 64 letters, digits, '.', "
                         "'_' or '-', starting with a letter or digit (e.g. alice or alice.smith)")
    return name


def _write_certificate(path: Path, public: bytes, secret: bytes | None) -> None:
    """A ZeroMQ certificate in zmq.auth's format (zmq.auth.load_certificate reads it). A secret one is
    created with mode 0600 (O_EXCL: never over an existing file), so it is never readable by others."""
    kind = "**Secret** Certificate" if secret else "Public Certificate"
    lines = [f"#   ****  Generated on {datetime.datetime.now()} by facerecon-backend  ****",
             f"#   ZeroMQ CURVE {kind}", "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


def generate_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write <name>.key and <name>.key_secret (Z85 certificates) into folder; refuse to overwrite,
    and refuse a name that is not plain (ValueError)."""
    check_key_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; delete it first to make a new key pair")
    public_key, secret_key = zmq.curve_keypair()
    _write_certificate(secret, public_key, secret_key)
    _write_certificate(public, public_key, None)
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


class KeyAuthenticator(ThreadAuthenticator):
    """ZAP handler (its own thread) admitting the CURVE public keys in `authorized` (Z85); each key it
    refuses goes to on_refused(peer address, key) from that thread."""

    def __init__(self, context: zmq.Context, authorized: set[bytes],
                 on_refused: Callable[[str, str], None]) -> None:
        super().__init__(context)
        self.authorized = authorized
        self.on_refused = on_refused
        self._address = ""                     # of the ZAP request being handled (one at a time)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider's check (pyzmq's configure_curve_callback)."""
        if key in self.authorized:
            return True
        self.on_refused(self._address, key.decode("ascii", "replace"))
        return False


def start_authenticator(context: zmq.Context, keys_dir: Path,
                        on_refused: Callable[[str, str], None]) -> tuple[ThreadAuthenticator, int]:
    """Admit CURVE clients whose public key is in keys_dir/authorized_clients (read now: restart to
    change); on_refused(address, key) hears of each other key. Returns (authenticator, key count)."""
    authorized = keys_dir / AUTHORIZED_FOLDER
    if not authorized.is_dir():
        raise FileNotFoundError(f"{authorized} is missing; put each artist's <name>.key there")
    keys = set(zmq.auth.load_certificates(authorized))
    authenticator = KeyAuthenticator(context, keys, on_refused)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=authenticator)
    return authenticator, len(keys)
