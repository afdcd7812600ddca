"""What a guest that stopped answering is doing.

Owns the account vmfork keeps when a guest command misses its deadline: the
guest's own view, asked through the serial agent (a channel apart from
qemu-guest-agent's) — load, blocked tasks with their kernel stacks, whether
the root file system takes a write, the NICs, the end of the kernel log —
and the host's view through QMP, which needs nothing from the guest: the run
state, each virtio queue (requests the guest published, the device took,
completed) and where the vCPUs are. Both go to a file in
``$VMFORK_HOME/diagnoses/`` that outlives the VM.
"""

from __future__ import annotations

import logging
from typing import Any

from vmfork import vm
from vmfork.errors import VmforkError
from vmfork.launch import attach
from vmfork.private import write_file
from vmfork.qemu.machine import Machine
from vmfork.records import VMRecord
from vmfork.store import Store
from vmfork.timeouts import DEFAULT, Timeouts

log = logging.getLogger("vmfork.diagnosis")

#: What the guest is asked: load, the tasks that are blocked (state D) or
#: running, with their kernel stacks, whether the root file system takes a
#: write, the NICs and the kernel's last words. Nothing in the foreground
#: may block: the write probe runs in the background (the file system may be
#: frozen), and so does ``ip`` (it needs RTNL, which a hung guest may hold:
#: the hang this module was written for was one), given 1 s.
GUEST_COMMAND = r"""
n=/run/vmfork-diag-ip.$$
{ ip -br link; ip -br addr; echo "(ip answered)"; } > "$n" 2>&1 &
p=/var/tmp/.vmfork-probe.$$; touch "$p" &
cat /proc/loadavg
for d in /proc/[0-9]*; do
  s=; while read -r k v _; do [ "$k" = State: ] && { s=$v; break; }; done < "$d/status" 2>/dev/null
  case "$s" in D|R) ;; *) continue;; esac
  c=; read -r c < "$d/comm" 2>/dev/null; w=; read -r w < "$d/wchan" 2>/dev/null
  a=$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null)
  echo "== pid ${d#/proc/} state $s comm $c wchan $w: $a"
  cat "$d/stack" 2>/dev/null
done
sleep 1
if [ -e "$p" ]; then echo "root fs: writable"; rm -f "$p" & else echo "root fs: a write blocks"; fi
cat "$n"; grep -q '^(ip answered)$' "$n" || echo "ip: no answer within 1 s (RTNL held?)"
rm -f "$n"
dmesg 2>/dev/null | tail -n 40
"""


async def diagnose(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> str:
    """Keep the guest's and the host's account of a hang of *rec*'s guest
    command in ``$VMFORK_HOME/diagnoses/``; return a phrase (``; ...``) that
    names the file for an error message ("" if it could not be written).

    The guest is asked only if the hung command went through
    qemu-guest-agent: the serial agent answers nothing else until its own
    command ends."""
    parts = ["== host (QMP)\n" + await host_view(store, rec, timeouts)]
    if rec.info.agent == "qga":
        try:
            r = await vm.guest_exec(store, rec, GUEST_COMMAND, 3 * timeouts.agent, timeouts,
                                    agent="serial")
            parts.append("== guest (serial agent)\n" + r.stdout + r.stderr)
        except VmforkError as exc:
            parts.append(f"== guest: the serial agent did not answer either: {exc}\n")
    try:
        path = store.diagnosis_file(rec.name)
        write_file(path, "\n".join(parts).encode())
    except OSError as exc:
        log.warning("%s: cannot keep the diagnosis: %s", rec.name, exc)
        return ""
    log.warning("%s: diagnosis in %s", rec.name, path)
    return f"; what the guest was doing is in {path}"


async def host_view(store: Store, rec: VMRecord, timeouts: Timeouts = DEFAULT) -> str:
    """The VM as QEMU sees it: run state, virtio queues, vCPUs (text)."""
    if rec.pid is None:
        return "no QEMU process\n"
    lines: list[str] = []
    try:
        m = await attach(store, rec, timeouts)
    except VmforkError as exc:
        return f"QMP unreachable: {exc}\n"
    try:
        await m.drain_console()  # the guest's console may say why it hangs
        lines.append(f"run state: {await m.status()}")
        for dev in await m.qmp("x-query-virtio"):
            lines += await _queues(m, dev)
        regs = await m.qmp("human-monitor-command", {"command-line": "info registers -a"})
        lines += [f"vCPU: {ln.strip()}" for ln in str(regs).splitlines() if "RIP=" in ln]
    except VmforkError as exc:
        lines.append(f"QMP: {exc}")
    finally:
        await m.disconnect()
    return "\n".join(lines) + "\n"


async def _queues(m: Machine, dev: dict[str, Any]) -> list[str]:
    """One line per virtqueue of *dev*: the avail index the guest published
    (read from guest memory), the one the device has taken, requests in the
    device (``inuse``) and the used index."""
    path = dev["path"]
    st = await m.qmp("x-query-virtio-status", {"path": path})
    out = [f"{dev['name']} ({path}): broken {st.get('broken')}, isr {st.get('isr')}"]
    for q in range(int(st.get("num-vqs", 0))):
        qs = await m.qmp("x-query-virtio-queue-status", {"path": path, "queue": q})
        if not qs.get("vring-desc") or not qs.get("vring-avail"):
            continue  # not set up by the driver
        word = await m.qmp("human-monitor-command",
                           {"command-line": f"xp /1hx {int(qs['vring-avail']) + 2:#x}"})
        try:
            guest_avail = str(int(str(word).split()[-1], 16))
        except (ValueError, IndexError):
            guest_avail = "?"
        if guest_avail == "0" and not qs["last-avail-idx"] and not qs["used-idx"]:
            continue  # never used
        out.append(f"  queue {q}: guest avail {guest_avail}, device took "
                   f"{qs['last-avail-idx']}, in device {qs['inuse']}, used {qs['used-idx']}")
    return out
