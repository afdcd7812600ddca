"""``vmfork serve`` (also installed as ``vmforkd``): run the REST API daemon."""

from __future__ import annotations

import asyncio

import click

from vmfork.cli.output import configure_logging


@click.command("serve")
@click.option("--listen", metavar="HOST:PORT",
              help="Serve TCP instead of the UNIX socket (needs --token-file).")
@click.option("--socket", "socket_path", metavar="PATH",
              help="UNIX socket to serve [default: $VMFORK_HOME/vmforkd.sock].")
@click.option("--token-file", metavar="FILE",
              help="Bearer token file (mode 0600; made with a new token if missing).")
@click.option("--tls-cert", metavar="FILE", help="TLS certificate (with --tls-key).")
@click.option("--tls-key", metavar="FILE", help="TLS private key.")
def serve_cmd(listen: str | None, socket_path: str | None, token_file: str | None,
              tls_cert: str | None, tls_key: str | None) -> None:
    """Serve vmfork's REST API until SIGTERM; VMs keep running after it ends."""
    configure_logging()
    from vmfork.service.server import serve
    # The server ends itself, gracefully, on SIGTERM and SIGINT.
    asyncio.run(serve(listen=listen, socket_path=socket_path, token_file=token_file,
                      tls_cert=tls_cert, tls_key=tls_key))
