"""CURVE authentication for daemons that listen beyond loopback.

A keys directory holds the daemon's key pair (``server.key``, ``server.key_secret``) and,
in ``clients/``, the public keys of the clients allowed in (``*.key``).  ``livediffusion
keys init DIR`` creates both plus one client pair in ``DIR/client``.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def init_keys(directory: str | Path) -> dict[str, Path]:
    """Create a server key pair and one client key pair (authorised) under ``directory``.
    Secrets are written 0600 in folders that are 0700 (on Windows, ACLs restricted to the
    user), so only their owner can read them."""
    root = Path(directory)
    for folder in (root, root / "clients", root / "client"):
        folder.mkdir(parents=True, exist_ok=True)
        _private(folder, 0o700)
    server_public, server_secret = zmq.auth.create_certificates(root, "server")
    client_public, client_secret = zmq.auth.create_certificates(root / "client", "client")
    for secret in (server_secret, client_secret):
        _private(Path(secret), 0o600)
    (root / "clients" / "client.key").write_bytes(Path(client_public).read_bytes())
    return {"server": Path(server_public), "client_secret": Path(client_secret)}


def _private(path: Path, mode: int) -> None:
    """Only the owner may read ``path``: ``mode`` on POSIX; on Windows, an ACL granting the
    current user alone (icacls), since chmod there only toggles read-only."""
    if os.name == "nt":
        import getpass
        import subprocess
        subprocess.run(["icacls", str(path), "/inheritance:r", "/grant:r",
                        f"{getpass.getuser()}:F"], check=False, capture_output=True)
        return
    os.chmod(path, mode)


def check_private(path: Path) -> None:
    """Refuse a secret that others can read (POSIX: any group or other permission bit on
    the file, or a folder others can enter and list)."""
    if os.name == "nt" or not path.exists():
        return
    loose = [p for p, bits in ((path, 0o077), (path.parent, 0o077))
             if p.stat().st_mode & bits]
    if loose:
        raise PermissionError(
            f"{loose[0]} can be read by other users (mode "
            f"{oct(loose[0].stat().st_mode & 0o777)}); the daemon will not start with a "
            f"readable secret: chmod 600 {path} and chmod 700 {path.parent} (or run "
            f"'livediffusion keys init' again).")


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
    check_private(secret_file)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(root / "clients"))
    public, secret = zmq.auth.load_certificate(secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth
