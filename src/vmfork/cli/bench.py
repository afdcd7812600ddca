"""``vmfork bench clone|update|save|api|fork|lazy|density``: benchmarks reported as
ratios against a baseline measured in the same run (the measurements live in
:mod:`vmfork.bench`). ``bench api`` starts a vmforkd of its own on the home
(:func:`bench_daemon`) unless it is given one; ``bench lazy`` starts a second
home with a daemon serving it over loopback (:func:`serving_home`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vmfork.cli.bench_density import bench_density
from vmfork.cli.output import ACCELS, configure_logging, emit_json, say
from vmfork.errors import InvalidInput, SetupError

if TYPE_CHECKING:
    from vmfork.bench.lazy import Serving as LazyServing
    from vmfork.store import Store

#: Seconds a bench daemon may take to serve, and to end after SIGTERM.
DAEMON_START_SECONDS = 30.0
DAEMON_STOP_SECONDS = 60.0


def _progress(msg: str) -> None:
    click.echo(f"bench: {msg}", err=True)


@click.group("bench")
def bench_cmd() -> None:
    """Benchmarks, reported as ratios against a baseline measured in the same run."""
    configure_logging()


@bench_cmd.command("clone")
@click.option("--image", type=click.Choice(["demo", "debian"]), default="demo",
              show_default=True, help="Guest: busybox demo or systemd Debian (disk).")
@click.option("--memory", default="512M", show_default=True, help="Guest RAM.")
@click.option("--data", "data_mb", default=200, show_default=True,
              help="MB of guest data in RAM.")
@click.option("--disk-data", "disk_mb", default=32, show_default=True,
              help="With --image debian: MB of data on disk (synced).")
@click.option("--counts", default="1,10,20", show_default=True,
              help="Clone counts for the memory comparison.")
@click.option("--samples", default=5, show_default=True)
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_clone(image: str, memory: str, data_mb: int, disk_mb: int, counts: str,
                samples: int, accel: str, as_json: bool) -> None:
    """Cold boot vs clone vs pool clone; memory of N clones vs N cold VMs."""
    from vmfork.bench import clone as bc
    from vmfork.bench import print_table
    from vmfork.spec import parse_memory
    from vmfork.store import Store

    try:
        cs = tuple(int(c) for c in counts.split(","))
    except ValueError as exc:
        raise InvalidInput(f"invalid --counts {counts!r}: use e.g. 1,10,20") from exc
    if not cs or min(cs) < 1 or list(cs) != sorted(cs):
        raise InvalidInput(f"invalid --counts {counts!r}: ascending positive numbers")
    if samples < 1:
        raise InvalidInput(f"invalid --samples {samples}: at least 1")
    params = bc.CloneBench(memory_mib=parse_memory(memory), data_mb=data_mb, counts=cs,
                           samples=samples, accel=accel, image=image, disk_mb=disk_mb,
                           progress=_progress)
    params.check()
    result = asyncio.run(bc.run(Store(), params))
    if as_json:
        emit_json(result)
        return
    print_table(bc.title(result), ["metric", "vmfork", "baseline", "ratio"], bc.rows(result))
    for target, ok in result["targets"].items():
        say(f"target {target}: {'met' if ok else 'NOT met'}")


@bench_cmd.command("update")
@click.option("--sizes", default="256M,1G,4G", show_default=True,
              help="Guest RAM sizes, comma separated.")
@click.option("--fill", default=0.55, show_default=True, type=float,
              help="Share of guest RAM filled with data.")
@click.option("--repeat", default=3, show_default=True, type=int,
              help="Updates per mode and size (the median is reported).")
@click.option("--modes", default="cpr-transfer,ignore-shared,copy", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_update(sizes: str, fill: float, repeat: int, modes: str, as_json: bool) -> None:
    """Live update in each mode at several RAM sizes, with ratios to copy."""
    from vmfork.bench import update as bu
    from vmfork.spec import parse_memory_list
    from vmfork.store import Store

    size_list = list(parse_memory_list(sizes))
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    result = asyncio.run(bu.run(Store(), size_list, mode_list, fill=fill, repeat=repeat,
                                progress=not as_json))
    if as_json:
        emit_json(result)
    else:
        bu.print_result(result)


@bench_cmd.command("save")
@click.option("--sizes", default="256M,1G,4G", show_default=True,
              help="Guest RAM sizes, comma-separated.")
@click.option("--fill", default=0.5, show_default=True, type=float,
              help="Share of guest RAM filled with incompressible data.")
@click.option("--samples", default=3, show_default=True, type=int,
              help="Save/restore cycles per size (median reported).")
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_save(sizes: str, fill: float, samples: int, accel: str, as_json: bool) -> None:
    """vmfork save/restore against a full-RAM save to a file and its restore."""
    from vmfork.bench import save as bs
    from vmfork.spec import parse_memory_list
    from vmfork.store import Store

    params = bs.SaveBench(sizes_mib=parse_memory_list(sizes), fill=fill, samples=samples,
                          accel=accel)
    if not as_json:
        params.progress = _progress
    result = asyncio.run(bs.run(Store(), params))
    if as_json:
        emit_json(result)
    else:
        bs.print_report(result)


@bench_cmd.command("fork")
@click.option("--sizes", default="256M,512M,4G", show_default=True,
              help="RAM sizes of the first forks, comma separated.")
@click.option("--data", "data_mb", default=200, show_default=True,
              help="MB of guest data in RAM (at most the RAM less 100 MiB).")
@click.option("--repeat-size", default="512M", show_default=True,
              help="The size (one of --sizes) whose parent is forked again after each "
                   "--dirty.")
@click.option("--dirty", default="0,8,32,128", show_default=True,
              help="MB the parent dirties before each repeated fork, comma separated.")
@click.option("--big-dirty", default=8, show_default=True,
              help="MB dirtied before one repeated fork at the largest size.")
@click.option("--memory", default="512M", show_default=True,
              help="RAM of the VM forked into --children for the memory comparison.")
@click.option("--children", default=10, show_default=True,
              help="Children of that fork (against children + 1 independent VMs).")
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_fork(sizes: str, data_mb: int, repeat_size: str, dirty: str, big_dirty: int,
               memory: str, children: int, accel: str, as_json: bool) -> None:
    """Live fork against a fork by full copy: parent pause at several RAM
    sizes, repeated forks, memory of a parent and its children."""
    from vmfork.bench import fork as bf
    from vmfork.cli import signals
    from vmfork.spec import parse_memory, parse_memory_list
    from vmfork.store import Store

    try:
        dirty_mb = tuple(int(d) for d in dirty.split(",") if d.strip())
    except ValueError as exc:
        raise InvalidInput(f"invalid --dirty {dirty!r}: use e.g. 0,8,32") from exc
    params = bf.ForkBench(sizes_mib=parse_memory_list(sizes), data_mb=data_mb,
                          repeat_mib=parse_memory(repeat_size), dirty_mb=dirty_mb,
                          big_dirty_mb=big_dirty, memory_mib=parse_memory(memory),
                          children=children, accel=accel, progress=_progress)
    params.check()
    result = signals.run(bf.run(Store(), params))
    if as_json:
        emit_json(result)
    else:
        bf.print_report(result)


@bench_cmd.command("lazy")
@click.option("--memory", default="512M", show_default=True, help="Guest RAM of the template.")
@click.option("--data", "data_mb", default=200, show_default=True,
              help="MB of guest data in the template's RAM.")
@click.option("--rate-limit", "rate", default="125M", show_default=True,
              help="Bytes per second the serving daemon sends (125M: a 1 Gbit/s link).")
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_lazy(memory: str, data_mb: int, rate: str, accel: str, as_json: bool) -> None:
    """Pull a template from a second vmfork home's daemon over loopback:
    lazily (with and without its working set) against eagerly against
    copying its files, each to its first clone answering; a second clone
    against a local one."""
    from vmfork.bench import lazy as bl
    from vmfork.cli import signals
    from vmfork.spec import parse_memory
    from vmfork.store import Store

    params = bl.LazyBench(memory_mib=parse_memory(memory), data_mb=data_mb,
                          rate=bl.parse_rate(rate), accel=accel, progress=_progress)
    params.check()
    store = Store()
    try:
        with serving_home(store, rate) as serving:
            result = signals.run(bl.run(store, serving, params))
    finally:
        store.close()
    if as_json:
        emit_json(result)
    else:
        bl.print_report(result)


@contextlib.contextmanager
def serving_home(store: Store, rate: str) -> Iterator[LazyServing]:
    """A second vmfork home beside *store*'s (its images shared through a
    symlink), with a daemon serving it on a free loopback port, bearer
    token and ``--rate-limit`` *rate*; both removed when the block ends."""
    import secrets
    import shutil
    import socket
    import tempfile

    from vmfork.bench.lazy import Serving
    from vmfork.private import make_dirs, write_file
    from vmfork.store import Store as HomeStore

    home = Path(tempfile.mkdtemp(prefix=".bench-lazy-serving-", dir=store.home))
    memory_dir = Path(tempfile.mkdtemp(prefix="vmfork-bench-lazy-",
                                       dir=store.memory_dir.parent))
    serving_store: Store | None = None
    try:
        (home / "images").symlink_to(make_dirs(store.images_dir))
        token = home / "token"
        write_file(token, secrets.token_urlsafe(32).encode())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "VMFORK_HOME": str(home), "VMFORK_MEMORY_DIR": str(memory_dir)}
        serving_store = HomeStore(home, memory_dir)
        with bench_daemon(home, listen=f"127.0.0.1:{port}", token_file=token,
                          args=("--rate-limit", rate), env=env) as url:
            yield Serving(serving_store, url, token)
    finally:
        if serving_store is not None:
            serving_store.close()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(memory_dir, ignore_errors=True)


@contextlib.contextmanager
def bench_daemon(home: Path, *, listen: str | None = None, token_file: Path | None = None,
                 args: Sequence[str] = (), env: dict[str, str] | None = None
                 ) -> Iterator[str]:
    """``vmfork serve`` for a benchmark: on a socket of its own in *home*, or
    on TCP address *listen* with bearer token *token_file* (then with
    environment *env*, e.g. another ``VMFORK_HOME``); *args* go to serve too.
    Yields the socket's path or the base URL once the daemon answers, and
    ends it (SIGTERM, then SIGKILL after a deadline) when the block ends."""
    import vmfork

    sock = home / f"vmforkd-bench-{os.getpid()}.sock"
    log = home / f"vmforkd-bench-{os.getpid()}.log"
    where = ["--socket", str(sock)]
    if listen:
        where = ["--listen", listen, "--token-file", str(token_file)]
    address = f"http://{listen}" if listen else str(sock)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vmfork", "serve", *where, *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    try:
        end = time.monotonic() + DAEMON_START_SECONDS
        with vmfork.Client(address, token_file=token_file, timeout=5) as probe:
            while True:
                if proc.poll() is not None:
                    raise SetupError(f"the bench's vmforkd ended ({proc.returncode}): "
                                     f"{log.read_text(errors='replace').strip()[-500:]}")
                try:
                    probe.health()
                    break
                except vmfork.DaemonUnreachable:
                    if time.monotonic() > end:
                        raise SetupError(f"the bench's vmforkd did not answer within "
                                         f"{DAEMON_START_SECONDS:g} s") from None
                    time.sleep(0.05)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(DAEMON_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:
            log.unlink(missing_ok=True)
        else:
            say(f"the bench's vmforkd exited {proc.returncode}; its log: {log}")


@bench_cmd.command("api")
@click.option("--samples", default=5, show_default=True,
              help="Clones per path (in-process, through the API).")
@click.option("--exec-samples", default=30, show_default=True,
              help="Guest commands per path.")
@click.option("--memory", default="256M", show_default=True, help="Guest RAM.")
@click.option("--accel", type=ACCELS, default="auto", show_default=True)
@click.option("--parts", default="exec,clone,concurrent", show_default=True,
              help="What to measure: exec, clone, concurrent.")
@click.option("--concurrent", "concurrent", default=50, show_default=True,
              help="Clone requests fired at once by the part concurrent (the issue's "
                   "50; each its own connection).")
@click.option("--socket", "address", metavar="PATH|URL",
              help="A vmforkd serving this home [default: start one for the run].")
@click.option("--token-file", metavar="FILE", help="Bearer token file of that daemon.")
@click.option("--json", "as_json", is_flag=True)
def bench_api(samples: int, exec_samples: int, memory: str, accel: str, parts: str,
              concurrent: int, address: str | None, token_file: str | None,
              as_json: bool) -> None:
    """Clone and exec through vmforkd's REST API vs the in-process library;
    concurrent clone requests (latency, 429/503 refusals, nothing lost or
    leaked)."""
    from vmfork.api.aio import AsyncHost
    from vmfork.bench import api as ba
    from vmfork.bench import print_table
    from vmfork.client.aio import AsyncClient
    from vmfork.spec import parse_memory
    from vmfork.store import Store

    params = ba.ApiBench(samples=samples, exec_samples=exec_samples,
                         memory_mib=parse_memory(memory), accel=accel,
                         concurrent=concurrent,
                         parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
                         progress=_progress)
    params.check()

    async def measure(where: str) -> dict[str, Any]:
        async with AsyncHost() as host, AsyncClient(where, token_file=token_file) as client:
            return await ba.run(host, client, params)

    store = Store()  # the home, made private if new, before the daemon's files go in
    home = store.home
    store.close()
    with contextlib.ExitStack() as stack:
        where = address or stack.enter_context(bench_daemon(home))
        result = asyncio.run(measure(where))
    if as_json:
        emit_json(result)
        return
    print_table(ba.title(result), ["metric", "through the API", "in-process", "ratio"],
                ba.rows(result))
    for target, ok in result["targets"].items():
        say(f"target {target}: {'met' if ok else 'NOT met'}")


bench_cmd.add_command(bench_density)


@bench_cmd.command("all")
@click.pass_context
def bench_all(ctx: click.Context) -> None:
    """Every benchmark at its defaults: clone, update, save, api, fork, lazy, density."""
    for command in (bench_clone, bench_update, bench_save, bench_api, bench_fork, bench_lazy,
                    bench_density):
        ctx.invoke(command)
