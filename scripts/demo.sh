#!/usr/bin/env bash
# The vmfork story, end to end on real QEMU: boot, template, clones, warm
# pool, live update, save/restore, live fork, the Python API, the daemon.
# Run by `make demo`; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
V=".venv/bin/vmfork"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ vmfork %s\n' "$*"; "$V" "$@"; }
json() { "$V" "$@" --json; }
field() { .venv/bin/python -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

cleanup() {
  if [ -n "${daemon:-}" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
  for vm in demo-vm _build.demo-tpl demo-tpl-1 demo-tpl-2 demo-tpl-3 demo-pooled demo-warm demo-saved demo-py demo-api demo-fork-a demo-fork-b; do
    "$V" stop "$vm" --force >/dev/null 2>&1 || true
  done
  "$V" template rm demo-tpl --force >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

say "1. The demo guest (busybox initramfs + the host's Debian kernel)"
run image demo

say "2. Boot a VM whose RAM lives in a file outside QEMU"
boot=$(json run demo-vm --demo --memory 256M)
echo "$boot"
run exec demo-vm -- cat /proc/version
run exec demo-vm -- 'head -c 8388608 /dev/urandom > /root/data; md5sum /root/data'
md5=$("$V" exec demo-vm -- md5sum /root/data | cut -d' ' -f1)

say "3. Freeze it as a template: device state only, RAM stays in its file"
run template create demo-tpl --from demo-vm
run template ls

say "4. Three copy-on-write clones"
clones=$(json clone demo-tpl -n 3)
echo "$clones" | field '"\n".join("%s: state loaded %.0f ms, running %.0f ms, answering %.0f ms" % (c["name"], c["state_loaded"]*1000, c["running"]*1000, c["responsive"]*1000) for c in d)'
for c in demo-tpl-1 demo-tpl-2 demo-tpl-3; do
  got=$("$V" exec "$c" -- md5sum /root/data | cut -d' ' -f1)
  host=$("$V" exec "$c" -- hostname)
  fork=$("$V" exec "$c" -- 'dmesg | grep -c "virtual machine fork"')
  echo "$c: hostname $host, data md5 $([ "$got" = "$md5" ] && echo intact || echo CHANGED), RNG reseeded on fork: $fork"
done
run ls

say "5. A pool: QEMU already waiting for the device state (cold), or already run once (warm)"
cold_boot=$(echo "$boot" | field 'd["boot_seconds"]')
run pool demo-tpl --size 1
json clone demo-tpl demo-pooled | field '"demo-pooled: running %.0f ms, answering %.0f ms after the request (cold boot took %.1f s)" % (d[0]["running"]*1000, d[0]["responsive"]*1000, '"$cold_boot"')'
run pool demo-tpl --size 1 --warm
json clone demo-tpl demo-warm | field '"demo-warm: running %.0f ms, answering %.0f ms after the request (cold boot took %.1f s)" % (d[0]["running"]*1000, d[0]["responsive"]*1000, '"$cold_boot"')'
run pool demo-tpl --size 0

if "$V" update --help >/dev/null 2>&1; then
  say "6. Live update: move a running VM into a new QEMU process, no RAM copy"
  run exec demo-tpl-1 -- '(i=0; while true; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done) >/dev/null 2>&1 &'
  sleep 1
  run exec demo-tpl-1 -- cat /run/counter
  run update demo-tpl-1 --mode copy
  run update demo-tpl-1
  run exec demo-tpl-1 -- cat /run/counter
  got=$("$V" exec demo-tpl-1 -- md5sum /root/data | cut -d' ' -f1)
  echo "demo-tpl-1: data md5 after two updates $([ "$got" = "$md5" ] && echo intact || echo "CHANGED ($got, was $md5)")"
fi

if "$V" save --help >/dev/null 2>&1; then
  say "7. Save and restore: only device state is written"
  run run demo-saved --demo --memory 256M --persistent
  run exec demo-saved -- 'echo kept > /root/note'
  run save demo-saved
  run ls
  run restore demo-saved
  run exec demo-saved -- cat /root/note
fi

say "8. Live fork: branch a running VM; it keeps running"
run exec demo-tpl-2 -- '(i=0; while true; do i=$((i+1)); echo $i 1<> /run/counter; done) >/dev/null 2>&1 &'
sleep 1
json fork demo-tpl-2 demo-fork-a demo-fork-b | field '"demo-tpl-2 paused %.1f ms; children running %s ms after the request; %d KiB of RAM written" % (d["parent_pause_ms"], " / ".join("%.0f" % c["running_ms"] for c in d["children"]), d["ram_bytes_written"] // 1024)'
for c in demo-tpl-2 demo-fork-a demo-fork-b; do
  echo "$c: counter $("$V" exec "$c" -- cat /run/counter), hostname $("$V" exec "$c" -- hostname)"
done
sleep 1
echo "a second later: demo-tpl-2 $("$V" exec demo-tpl-2 -- cat /run/counter), demo-fork-a $("$V" exec demo-fork-a -- cat /run/counter) (each counts on its own)"

say "9. The same through the Python API"
.venv/bin/python - <<'PY'
import vmfork

with vmfork.open() as host:
    tpl = host.template("demo-tpl")
    with tpl.clone(name="demo-py") as c:  # stopped when the block ends
        r = c.exec("hostname; echo to-stderr >&2; exit 3")
        print(f"{c.name}: running {c.result.running * 1000:.0f} ms after the request; "
              f"exec: exit {r.exit_code}, stdout {r.stdout!r}, stderr {r.stderr!r}")
    print("VMs:", ", ".join(f"{s.name} ({s.state})" for s in host.ls()))
PY

say "10. The same over the REST API of the daemon (vmforkd)"
sock="${VMFORK_HOME:-$HOME/.local/share/vmfork}/vmforkd.sock"
"$V" serve & daemon=$!
for _ in $(seq 100); do curl -sf --unix-socket "$sock" http://vmforkd/v1/health >/dev/null && break; sleep 0.1; done
api() { printf '$ curl --unix-socket %s %s\n' "$sock" "$*"; curl -sS --unix-socket "$sock" "$@"; echo; }
api -X POST http://vmforkd/v1/templates/demo-tpl/clones -H 'content-type: application/json' \
    -d '{"names": ["demo-api"]}' -o /dev/null -w 'HTTP %{http_code}'
api -X POST http://vmforkd/v1/vms/demo-api/exec -H 'content-type: application/json' \
    -d '{"command": "hostname; md5sum /root/data"}'
api -X DELETE http://vmforkd/v1/vms/demo-api
kill -TERM "$daemon"; wait "$daemon"; daemon=

say "Done; cleaning up"
