"""``vmfork image demo|debian``: build the guest images vmfork boots."""

from __future__ import annotations

import click

from vmfork.cli.output import configure_logging, emit_json, say


@click.group("image")
def image_cmd() -> None:
    """Build guest images."""
    configure_logging()


@image_cmd.command("demo")
@click.option("--rebuild", is_flag=True, help="Build even if a cached image is current.")
@click.option("--json", "as_json", is_flag=True)
def image_demo(rebuild: bool, as_json: bool) -> None:
    """Build (once) the busybox demo guest from the host's kernel."""
    from vmfork.images.demo import demo_image
    from vmfork.store import Store

    img = demo_image(Store().images_dir, rebuild=rebuild)
    if as_json:
        emit_json(img.to_dict())
    else:
        say(f"kernel: {img.kernel}\ninitrd: {img.initrd}")


@image_cmd.command("debian")
@click.option("--size", default=None, help="Disk size, e.g. 2G [default: 2G, or the cached "
              "image's size].")
@click.option("--rebuild", is_flag=True, help="Build even if a cached image is current.")
@click.option("--json", "as_json", is_flag=True)
def image_debian(size: str | None, rebuild: bool, as_json: bool) -> None:
    """Build (once, as root) a Debian bookworm disk image with systemd."""
    from vmfork.images.debian import debian_image
    from vmfork.store import Store

    img = debian_image(Store().images_dir, size=size, rebuild=rebuild)
    if as_json:
        emit_json(img.to_dict())
    else:
        say(f"disk: {img.disk}\nkernel: {img.kernel}\ninitrd: {img.initrd}")
