#!/usr/bin/env bash
# A mixed federation on this x86_64 host: SuperLink (x86_64, host process), SuperNode 0 (x86_64,
# host process), SuperNode 1 = the arm64 edge image (this branch, docker/edge-site.Dockerfile, torch
# 2.9.1 CPU) under qemu-user-static emulation, held to --cpus 1 --memory 512m (ARM_MEMORY), its
# node cache cold, its state-dir in a volume. One round (5 local steps), then the run status.
set -u
APP=${APP:?the app directory (a copy of this repository)}
W=${W:-/var/tmp/prism-edge2/arm64-512m}; rm -rf "$W"; mkdir -p "$W/home" "$W/out"
V=/work/main/.venv/bin
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$W"  # Podman's conmon writes an empty file `oom` into its working directory at an OOM kill
free() { $V/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
LINK=$(free); N0=$(free); N1=$(free)
export FLWR_HOME=$W/home FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 PATH=$V:$PATH
printf '[superlink.mixed]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$LINK" > "$W/home/config.toml"
echo "[$(date -u +%T)] host $(uname -m), $(nproc) CPUs; SuperLink 127.0.0.1:$LINK"
setsid $V/flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK" > "$W/superlink.log" 2>&1 & LP=$!
sleep 8
setsid $V/flower-supernode --insecure --superlink "127.0.0.1:$LINK" --host 127.0.0.1 --port "$N0" \
    --node-config "partition-id=0 num-partitions=2 data-dir='${DATA:-/var/tmp/prism-edge2/data}' state-dir='$W/state-0'" > "$W/supernode-x86.log" 2>&1 & NP=$!
podman rm -f prism-edge2-arm64 >/dev/null 2>&1; podman volume rm -f prism-edge2-arm64-state >/dev/null 2>&1
# QEMU_CPU=cortex-a72 (a Raspberry Pi 4's core): qemu 7.2's default "max" CPU advertises
# features whose emulation oneDNN's aarch64 JIT trips over (SIGILL at the first convolution).
# Under emulation a fresh flwr-clientapp cannot send its first heartbeat within Flower's 30 s on
# this busy host: process isolation and the warm executor (heartbeat first, then the imports).
# The warm executor is started as a module function: `prism-flwr clientapp-executor` imports torch
# in the executor's own process (the cli's other subcommands need it), besides its worker's.
# NOTHP=1: transparent huge pages off for the container's processes (nothp.py, inherited through
# podman, conmon and runc): qemu-user backs each emulated process's translation cache with them.
$( [ -n "${NOTHP:-}" ] && echo "python3 $HERE/nothp.py" ) podman run -d --name prism-edge2-arm64 --platform linux/arm64 --network host --cpus 1 --memory ${ARM_MEMORY:-512m} --memory-swap ${ARM_MEMORY:-512m} \
    -e FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    -v /usr/share/datasets/fashion-mnist:/usr/share/datasets/fashion-mnist:ro \
    -e QEMU_CPU=cortex-a72 \
    -v prism-edge2-arm64-state:/app/.local/state/prism-flwr --entrypoint sh ${IMAGE:-localhost/prism-flwr/edge:arm64-edge2} -c \
    "flower-supernode --insecure --superlink 127.0.0.1:$LINK --host 127.0.0.1 --port $N1 --isolation process \
     --node-config 'partition-id=1 num-partitions=2' & exec python -c 'import sys; from prism_flwr.deployment import executor; sys.exit(executor.serve(executor.Endpoint(sys.argv[1], True, None, None)))' 127.0.0.1:$N1" > /dev/null
echo "[$(date -u +%T)] arm64 container started (NOTHP=${NOTHP:-}): $(podman inspect --format '{{.Architecture}} {{.Os}}' ${IMAGE:-localhost/prism-flwr/edge:arm64-edge2})"
for i in $(seq 1 90); do
    n=$($V/flwr supernode ls mixed --format json 2>/dev/null | $V/python -c "import json,sys; print(sum(n.get('status')=='online' for n in json.load(sys.stdin).get('nodes',[])))" 2>/dev/null)
    [ "$n" = 2 ] && break; sleep 2
done
echo "[$(date -u +%T)] SuperNodes online: $n"
( while podman ps -q --filter name=prism-edge2-arm64 | grep -q .; do podman stats --no-stream --format '{{.MemUsage}}' prism-edge2-arm64 >> "$W/arm64-mem.txt" 2>/dev/null; sleep 2; done ) & SP=$!
cd "$W/home"
t0=$(date +%s)
timeout 2400 $V/flwr run "$APP" mixed --stream --run-config "num-server-rounds=1 local-steps=5 eval-samples=200 eval-feature-metrics=false min-train-nodes=2 uplink-coding=\"raw\" downlink=\"float32\" download=false data-dir='${DATA:-/var/tmp/prism-edge2/data}' output-dir='$W/out'" > "$W/flwr-run.log" 2>&1
echo "[$(date -u +%T)] flwr run returned after $(( $(date +%s) - t0 )) s"
$V/flwr ls mixed --format json | $V/python -c "import json,sys; r=max(json.load(sys.stdin)['runs'], key=lambda r: r['pending-at']); print('run status:', r['status'], r.get('status-details',''))"
cat "$W/out/latest/history.json" 2>/dev/null | $V/python -c "import json,sys; [print('round %d: clients %d, dropped %s' % (r['round'], r['clients'], r.get('dropped'))) for r in json.load(sys.stdin) if r['round']>=1]"
echo "--- arm64 node, peak of podman stats (sampled every 2 s): $(sort -h "$W/arm64-mem.txt" | tail -1)"
d=$(ls -d /sys/fs/cgroup/memory/libpod_parent/libpod-$(podman inspect --format '{{.Id}}' prism-edge2-arm64) 2>/dev/null)
[ -n "$d" ] && echo "--- arm64 cgroup: max_usage $(( $(cat $d/memory.max_usage_in_bytes) / 1048576 )) MiB, limit $(( $(cat $d/memory.limit_in_bytes) / 1048576 )) MiB, failcnt $(cat $d/memory.failcnt), $(grep oom_kill $d/memory.oom_control | tr '\n' ' ')"
echo "--- podman inspect: OOMKilled=$(podman inspect --format "{{.State.OOMKilled}}" prism-edge2-arm64)"
echo "--- arm64 node log (podman logs -t)"; podman logs -t prism-edge2-arm64 2>&1 | tail -60
echo "--- flwr run log"; tail -40 "$W/flwr-run.log"
kill $SP 2>/dev/null; podman rm -f -t 2 prism-edge2-arm64 >/dev/null; podman volume rm -f prism-edge2-arm64-state >/dev/null
kill -- -$NP -$LP; sleep 3; kill -9 -- -$NP -$LP 2>/dev/null
echo "[$(date -u +%T)] done"
