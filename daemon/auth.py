"""CURVE authentication for daemons that listen beyond loopback.

A keys directory holds the daemon's key pair (``server.key``, ``server.key_secret``) and,
in ``clients/``, the public keys of the clients allowed in (``*.key``).  ``livediffusion
keys init DIR`` creates both plus one client pair in ``DIR/client``.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def init_keys(directory: str | Path) -> dict[str, Path]:
    """Create a server key pair and one client key pair (authorised) under ``directory``."""
    root = Path(directory)
    (root / "clients").mkdir(parents=True, exist_ok=True)
    (root / "client").mkdir(parents=True, exist_ok=True)
    server_public, _ = zmq.auth.create_certificates(root, "server")
    client_public, client_secret = zmq.auth.create_certificates(root / "client", "client")
    (root / "clients" / "client.key").write_bytes(Path(client_public).read_bytes())
    return {"server": Path(server_public), "client_secret": Path(client_secret)}


def client_keys(directory: str | Path) -> dict[str, bytes]:
    """Keys a client needs, from a directory holding server.key and client.key_secret."""
    root = Path(directory)
    server_public, _ = zmq.auth.load_certificate(root / "server.key")
    public, secret = zmq.auth.load_certificate(root / "client" / "client.key_secret")
    return {"server_public": server_public, "public": public, "secret": secret}


def start_curve_server(ctx: zmq.Context, socket: zmq.Socket, directory: str | Path
                       ) -> ThreadAuthenticator:
    """Make ``socket`` a CURVE server admitting only the clients listed in the directory."""
    root = Path(directory)
    secret_file = root / "server.key_secret"
    if not secret_file.exists():
        raise FileNotFoundError(f"{secret_file} is missing; run 'livediffusion keys init "
                                f"{root}' first.")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(root / "clients"))
    public, secret = zmq.auth.load_certificate(secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth
