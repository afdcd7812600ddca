"""vmforkd's templates, clones, daemon-kept pools, events, operations and
metrics: a real daemon process on a temporary socket, with real QEMU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from vmfork.templates import catalog

from .conftest import Env, qemu_processes, run
from .daemon import Daemon, daemon, start_daemon, stop_daemon  # noqa: F401

pytestmark = pytest.mark.qemu
T = TypeVar("T")

#: Seconds a test waits for the daemon's background work (a refill, a
#: replacement, an operation) before it fails.
BACKGROUND_DEADLINE = 180.0


@pytest.fixture(autouse=True)
def templates_removed(env: Env) -> Iterator[None]:
    """Remove the test's templates at its end, after its daemon has stopped,
    with their pool members (which env's teardown does not know of)."""
    yield
    s = env.store()
    for name in s.template_names():
        with contextlib.suppress(Exception):
            run(catalog.remove(s, name, force=True))
    s.close()


def poll(what: str, probe: Callable[[], T | None], deadline: float = BACKGROUND_DEADLINE) -> T:
    """The first true value of *probe*, asked every 0.2 s until *deadline*."""
    end = time.monotonic() + deadline
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


class EventReader:
    """The daemon's event stream, read on a thread of its own."""

    def __init__(self, d: Daemon) -> None:
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)),
                                   base_url="http://vmforkd", timeout=None)
        self.events: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.subscribed.wait(30), "the event stream did not start"

    def _read(self) -> None:
        with contextlib.suppress(httpx.HTTPError):  # closed by the test, or the daemon ended
            self._frames()

    def _frames(self) -> None:
        with self.client.stream("GET", "/v1/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith(": subscribed"):
                    self.subscribed.set()
                elif line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
                    assert kind is not None and data.get("kind", "dropped") in (kind, "dropped")
                    self.events.append(data if "kind" in data else {"kind": kind, **data})

    def kinds(self, **match: object) -> list[str]:
        return [e["kind"] for e in list(self.events)
                if all(e.get(k) == v for k, v in match.items())]

    def close(self) -> None:
        self.client.close()


def metric_value(text: str, sample: str) -> float | None:
    """The value of the sample line that starts with *sample* (name{labels})."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def home_qemus(env: Env) -> set[int]:
    return {p.pid for p in qemu_processes(str(env.home))}


def test_export_template_from_a_vm_clones_and_events(env: Env, daemon: Daemon,  # noqa: F811
                                                     tmp_path: Path) -> None:
    reader = EventReader(daemon)
    r = daemon.post("/v1/vms", json={"name": "a", "image": "demo", "accel": "tcg"})
    assert r.status_code == 201, r.text
    r = daemon.post("/v1/vms/a/exec", json={
        "command": "head -c 65536 /dev/urandom > /root/data && md5sum /root/data"})
    md5 = r.json()["stdout"].split()[0]

    # An export is an operation: 202 at once, then done with its result.
    r = daemon.post("/v1/vms/a/export", json={"file": "relative.vmfork"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid")
    snap = tmp_path / "a.vmfork"
    r = daemon.post("/v1/vms/a/export", json={"file": str(snap)})
    assert r.status_code == 202, r.text
    op = r.json()
    assert op["kind"] == "export" and op["state"] == "running"
    assert r.headers["location"] == f"/v1/operations/{op['id']}"
    done = poll("the export", lambda: (lambda o: o if o["state"] != "running" else None)(
        daemon.get(f"/v1/operations/{op['id']}").json()))
    assert done["state"] == "done", done
    assert done["result"]["file"] == str(snap) and snap.stat().st_size == done["result"]["size"]
    assert "seconds" in done["progress"]
    assert daemon.get("/v1/operations/nope").status_code == 404

    # So is an image build (the demo image is built already: done at once).
    assert daemon.post("/v1/images/nope").status_code == 400
    r = daemon.post("/v1/images/demo")
    assert r.status_code == 202, r.text
    img = r.json()["id"]
    done = poll("the image", lambda: (lambda o: o if o["state"] != "running" else None)(
        daemon.get(f"/v1/operations/{img}").json()))
    assert (done["state"], done["result"]["name"]) == ("done", "demo"), done
    assert Path(done["result"]["kernel"]).is_file()

    # An import is one too; the snapshot file becomes a template.
    r = daemon.post("/v1/snapshots/import", json={"file": str(snap), "name": "imp",
                                                  "as_template": True})
    assert r.status_code == 202, r.text
    imp = r.json()["id"]
    done = poll("the import", lambda: (lambda o: o if o["state"] != "running" else None)(
        daemon.get(f"/v1/operations/{imp}").json()))
    assert (done["state"], done["result"]["name"]) == ("done", "imp"), done
    assert daemon.http.delete("/v1/templates/imp").status_code == 200

    # A template from the running VM, and three clones of it.
    r = daemon.post("/v1/templates", json={"name": "t", "from_vm": "a", "image": "demo"})
    assert r.status_code == 400
    r = daemon.post("/v1/templates", json={"name": "t", "from_vm": "a"})
    assert r.status_code == 201, r.text
    tpl = r.json()
    assert tpl["status"] == "ready" and tpl["manifest"]["source_vm"] == "a"
    assert [t["name"] for t in daemon.get("/v1/templates").json()] == ["t"]
    assert daemon.get("/v1/templates/t").json()["manifest"]["name"] == "t"
    assert daemon.get("/v1/templates/nope").status_code == 404
    r = daemon.post("/v1/templates/t/clones", json={"count": 3})
    assert r.status_code == 201, r.text
    clones = r.json()["clones"]
    names = sorted(c["name"] for c in clones)
    assert len(set(names)) == 3 and all(c["responsive"] > 0 for c in clones)
    for n in names:
        out = daemon.post(f"/v1/vms/{n}/exec", json={"command": "md5sum /root/data"}).json()
        assert out["stdout"].split()[0] == md5, n
    assert sorted(c["name"] for c in daemon.get("/v1/templates/t/clones").json()) == names
    r = daemon.post("/v1/templates/t/clones", json={"names": ["x1", "x2"]})
    assert sorted(c["name"] for c in r.json()["clones"]) == ["x1", "x2"], r.text
    r = daemon.post("/v1/templates/t/clones", json={"count": 2, "names": ["y"]})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid")
    # One clone of a batch failing (its hook): the answer is the error
    # 'partial' naming it, the other runs (and is announced); with
    # all_or_nothing none is left, and the answer is the clone's own error.
    r = daemon.post("/v1/templates/t/clones",
                    json={"names": ["z1", "z2"], "on_clone": '[ "$(hostname)" != z2 ]'})
    assert (r.status_code, r.json()["error"]["code"]) == (500, "partial"), r.text
    assert "1 of 2 clones failed" in r.json()["error"]["message"], r.text
    r = daemon.post("/v1/templates/t/clones",
                    json={"names": ["w1", "w2"], "on_clone": '[ "$(hostname)" != w2 ]',
                          "all_or_nothing": True})
    assert (r.status_code, r.json()["error"]["code"]) == (502, "guest"), r.text
    vms = {v["name"] for v in daemon.get("/v1/vms").json()}
    assert "z1" in vms and not {"z2", "w1", "w2"} & vms, vms

    # In use: refused without force; with force, its clones are stopped too.
    r = daemon.http.delete("/v1/templates/t")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "conflict")
    assert daemon.http.delete("/v1/templates/t", params={"force": "true"}).status_code == 200
    assert daemon.get("/v1/templates/t").status_code == 404
    assert daemon.get("/v1/vms").json() == []

    poll("the template_removed event", lambda: reader.kinds(kind="template_removed",
                                                            template="t"))
    reader.close()
    kinds = reader.kinds()
    assert kinds.index("started") < kinds.index("operation_done") < kinds.index(
        "template_created")
    assert reader.kinds(template="t") == ["stopped", "template_created", *["cloned"] * 6,
                                          "template_removed"]
    assert reader.kinds(template="imp") == ["template_created", "template_removed"]
    listed = [o["kind"] for o in daemon.get("/v1/operations").json()]
    assert listed == ["import", "image", "export"]  # newest first
    assert reader.kinds(vm="a") == ["started", "stopped"]
    assert reader.kinds(vm=names[0]) == ["cloned", "stopped"]


def test_pool_kept_by_the_daemon_and_metrics(env: Env, daemon: Daemon) -> None:  # noqa: F811
    reader = EventReader(daemon)
    r = daemon.post("/v1/templates", json={"name": "p", "image": "demo", "memory": "256M",
                                           "accel": "tcg", "prepare": "echo ok > /root/p"})
    assert r.status_code == 201, r.text
    assert r.json()["manifest"]["source_vm"]
    r = daemon.http.put("/v1/templates/p/pool", json={"size": 1, "warm": True})
    assert r.status_code == 200, r.text
    pool = r.json()
    assert (pool["target"], pool["warm"], pool["ready"], pool["kept"]) == (1, True, 1, True)
    first = pool["members"][0]["id"]

    # A clone takes the member; the daemon refills the pool by itself.
    r = daemon.post("/v1/templates/p/clones", json={"count": 1})
    assert r.status_code == 201, r.text
    c = r.json()["clones"][0]
    assert c["pooled"] is True
    assert daemon.post(f"/v1/vms/{c['name']}/exec",
                       json={"command": "cat /root/p"}).json()["stdout"] == "ok\n"

    def refilled() -> dict[str, Any] | None:
        p = daemon.get("/v1/templates/p/pool").json()
        return p if p["ready"] == 1 and p["members"][0]["id"] != first else None

    second = poll("the refill", refilled)["members"][0]

    # A member whose QEMU is killed is replaced.
    os.kill(second["pid"], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        p = daemon.get("/v1/templates/p/pool").json()
        return p if p["ready"] == 1 and p["members"][0]["id"] != second["id"] else None

    third = poll("the replacement", replaced)["members"][0]
    assert third["warm"] is True

    text = daemon.get("/metrics").text
    assert metric_value(text, 'vmfork_clone_duration_seconds_count{source="warm",'
                              'template="p"}') == 1.0
    assert metric_value(text, 'vmfork_vms{state="running"}') == 1.0
    assert metric_value(text, 'vmfork_pool_ready{kind="warm",template="p"}') == 1.0
    assert metric_value(text, 'vmfork_template_memory_bytes{template="p"}') == 256 << 20
    assert metric_value(text, 'vmfork_qemu_processes') == 2.0
    assert metric_value(text, 'vmfork_operations_total{op="clone",result="done"}') == 1.0
    assert metric_value(text, 'vmfork_operation_duration_seconds_count{op="template_create"}'
                        ) == 1.0
    private = metric_value(text, 'vmfork_clone_memory_bytes{kind="private"}')
    shared = metric_value(text, 'vmfork_clone_memory_bytes{kind="shared"}')
    assert private is not None and shared is not None and private > 0 and shared > 0

    # The clone's process dies: the daemon records it dead.
    os.kill(c["pid"], signal.SIGKILL)
    store = env.store()
    poll("the dead clone recorded", lambda: store.get_vm(c["name"]).state == "dead")
    assert daemon.get(f"/v1/vms/{c['name']}").json()["state"] == "dead"
    poll("the died event", lambda: reader.kinds(vm=c["name"]) == ["cloned", "died"])
    assert reader.kinds(template="p", member=second["id"]) == ["pool_member_died"]
    assert reader.kinds(kind="pool_refilled", template="p")
    reader.close()

    r = daemon.http.put("/v1/templates/p/pool", json={"size": 0})
    assert (r.json()["ready"], r.json()["kept"]) == (0, False)
    assert daemon.http.delete("/v1/templates/p", params={"force": "true"}).status_code == 200
    assert "template=\"p\"" not in daemon.get("/metrics").text


def _template_for_clones(d: Daemon, name: str) -> None:
    r = d.post("/v1/templates", json={"name": name, "image": "demo", "memory": "256M",
                                      "accel": "tcg"})
    assert r.status_code == 201, r.text


def test_twenty_concurrent_clone_requests(env: Env, daemon: Daemon) -> None:  # noqa: F811
    _template_for_clones(daemon, "c")
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)),
                          base_url="http://vmforkd", timeout=600) as http:
            r = http.post("/v1/templates/c/clones", json={"count": 1})
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert len(answers) == 20
    made = []
    for r in answers:
        if r.status_code == 201:
            made.append(r.json()["clones"][0]["name"])
        else:
            assert r.status_code in (429, 503) and r.headers.get("retry-after"), r.text
    assert made and len(set(made)) == len(made)
    vms = daemon.get("/v1/vms").json()
    assert sorted(v["name"] for v in vms) == sorted(made)
    assert {v["state"] for v in vms} == {"running"}
    assert home_qemus(env) == {v["pid"] for v in vms}  # nothing leaked
    assert daemon.http.delete("/v1/templates/c", params={"force": "true"}).status_code == 200
    assert home_qemus(env) == set()


def test_daemon_killed_during_a_clone(env: Env, daemon: Daemon) -> None:  # noqa: F811
    _template_for_clones(daemon, "k")
    store = env.store()
    failed: list[BaseException] = []

    def clone() -> None:
        try:
            daemon.post("/v1/templates/k/clones", json={"count": 3})
        except httpx.TransportError as exc:
            failed.append(exc)

    t = threading.Thread(target=clone)
    t.start()
    poll("a clone being started",
         lambda: [r for r in store.list_vms() if r.template == "k"], deadline=120)
    daemon.kill9()
    t.join(60)
    assert failed, "the clone request was answered before the kill"

    again = start_daemon(env)
    try:
        def settled() -> tuple[list[dict[str, Any]]] | None:
            vms: list[dict[str, Any]] = again.get("/v1/vms").json()
            return (vms,) if all(v["state"] == "running" for v in vms) else None

        (vms,) = poll("the abandoned clones to be undone", settled)
        for v in vms:  # those left are complete: they answer
            r = again.post(f"/v1/vms/{v['name']}/exec", json={"command": "true"})
            assert r.json()["exit_code"] == 0, r.text
        assert home_qemus(env) == {v["pid"] for v in vms}, "a QEMU process is orphaned"
        assert again.http.delete("/v1/templates/k",
                                 params={"force": "true"}).status_code == 200
    finally:
        assert stop_daemon(again) == 0
