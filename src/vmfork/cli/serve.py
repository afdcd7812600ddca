"""``vmfork serve`` (also installed as ``vmforkd``): run the REST API daemon."""

from __future__ import annotations

import asyncio

import click

from vmfork.cli.output import configure_logging
from vmfork.service.gate import MAX_STARTS, START_QUEUE


@click.command("serve")
@click.option("--listen", metavar="HOST:PORT",
              help="Serve TCP instead of the UNIX socket (needs --token-file).")
@click.option("--socket", "socket_path", metavar="PATH",
              help="UNIX socket to serve [default: $VMFORK_HOME/vmforkd.sock].")
@click.option("--token-file", metavar="FILE",
              help="Bearer token file (mode 0600; made with a new token if missing).")
@click.option("--tls-cert", metavar="FILE", help="TLS certificate (with --tls-key).")
@click.option("--tls-key", metavar="FILE", help="TLS private key.")
@click.option("--max-starts", type=click.IntRange(min=1), default=MAX_STARTS, show_default=True,
              help="QEMU starts (run, clone, restore, update) at once.")
@click.option("--start-queue", type=click.IntRange(min=0), default=START_QUEUE,
              show_default=True,
              help="Starts that may wait for a slot; more are refused (429, Retry-After).")
@click.option("--rate-limit", metavar="RATE",
              help="Cap the bytes/s of all template file answers together (what 'template "
                   "pull' on other hosts reads), e.g. 125M for a 1 Gbit/s link; K, M, G "
                   "are powers of 1000.")
@click.option("--print-openapi", is_flag=True, hidden=True,
              help="Print the OpenAPI document (docs/openapi.json) and exit.")
def serve_cmd(listen: str | None, socket_path: str | None, token_file: str | None,
              tls_cert: str | None, tls_key: str | None, max_starts: int, start_queue: int,
              rate_limit: str | None, print_openapi: bool) -> None:
    """Serve vmfork's REST API until SIGTERM; VMs keep running after it ends."""
    if print_openapi:
        from vmfork.service.openapi import render
        click.echo(render(), nl=False)
        return
    configure_logging()
    from vmfork.service.server import serve
    from vmfork.service.template_files import parse_rate
    rate = parse_rate(rate_limit) if rate_limit is not None else None
    # The server ends itself, gracefully, on SIGTERM and SIGINT.
    asyncio.run(serve(listen=listen, socket_path=socket_path, token_file=token_file,
                      tls_cert=tls_cert, tls_key=tls_key, max_starts=max_starts,
                      start_queue=start_queue, rate_limit=rate,
                      on_ready=lambda where: click.echo(f"vmforkd: serving {where}", err=True)))
