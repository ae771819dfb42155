#!/usr/bin/env bash
# Resident memory of the Ray simulation's ClientApp actors: `flwr run` of the default app (2
# SuperNodes, 1 CPU each, default run config but 1 round, no feature metrics), every ray::
# ClientAppActor process's RSS and RssAnon sampled every 0.5 s from /proc while the run goes on.
# Usage: ray-actor-rss.sh APP_DIR LABEL   (run once per tree, one after the other)
set -u
APP=$1; LABEL=$2
W=/var/tmp/prism-edge2/ray-$LABEL; rm -rf "$W"; mkdir -p "$W/home" "$W/out"
V=/work/main/.venv/bin
export FLWR_HOME=$W/home FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PATH=$V:$PATH
$V/python - "$W" > "$W/actors.txt" <<'PY' & SAMPLER=$!
import os, sys, time
w = sys.argv[1]
peak = {}
def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(("VmRSS", "RssAnon", "RssFile"))}
t_end = time.time() + 1800
while time.time() < t_end and not os.path.exists(f"{w}/stop"):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if "ClientAppActor" not in cmd:
                continue
            env = open(f"/proc/{pid}/environ", "rb").read()
            s = status(pid)
        except OSError:
            continue
        if f"FLWR_HOME={w}/home".encode() not in env:  # only this run's actors
            continue
        p = peak.setdefault(pid, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0})
        for k in p:
            p[k] = max(p[k], s[k])
    time.sleep(0.5)
for pid, p in sorted(peak.items()):
    print(f"actor pid {pid}: peak RSS {p['VmRSS']:.0f} MiB, peak anon {p['RssAnon']:.0f} MiB, peak file {p['RssFile']:.0f} MiB")
PY
t0=$(date +%s)
( cd "$W/home" && timeout 1500 $V/flwr run "$APP" --stream \
    --federation-config "num-supernodes=2 client-resources-num-cpus=1" \
    --run-config "num-server-rounds=1 eval-feature-metrics=false download=false data-dir='/var/tmp/prism-edge2/data' output-dir='$W/out'" ) > "$W/flwr-run.log" 2>&1
echo "[$LABEL] flwr run returned after $(( $(date +%s) - t0 )) s: $(grep -E 'round 1|clients' "$W/flwr-run.log" | tail -2 | tr '\n' ' ')"
touch "$W/stop"; wait $SAMPLER; cat "$W/actors.txt"
# the detached SuperLink that `flwr run` started with this FLWR_HOME
for pid in $(pgrep -f flower-superlink); do
    tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "FLWR_HOME=$W/home" && kill "$pid"
done
