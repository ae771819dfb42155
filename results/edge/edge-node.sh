#!/usr/bin/env bash
# ROUNDS rounds (default 3) of the default run config with one edge container (docker/edge.Dockerfile
# or edge-site.Dockerfile, IMAGE; its entrypoint as shipped) held to --cpus 1 --memory MEMORY
# --memory-swap MEMORY, its node cache cold (the first train message builds it), its state-dir in
# a volume; SuperLink and the other SuperNode are host processes. Prints the round log, the run's
# status, the container's cgroup peak and OOM counters, and each of its processes' peak memory
# (benchmarks/node_memory.py). Earlier logs here were made by this script as x86-768m-3rounds.sh.
#   MEMORY=512m APP=<a copy of this repository> bash results/edge/edge-node.sh
# ENTRYPOINT (JSON) replaces the image's, e.g. '["prism-flwr","supernode","--idle-poll","0.2","--"]'
# for Flower's SuperExec and a process per message. RUN_CONFIG: more run-config keys; NODE_ENV: one
# more variable for the container. The arm64 image under emulation (results/edge/README.md):
#   IMAGE=localhost/prism-flwr/edge:arm64 ROUNDS=1 NODE_ENV=QEMU_CPU=cortex-a72 \
#   RUN_CONFIG='local-steps=5 uplink-coding="raw" downlink="float32"' MEMORY=512m APP=... bash edge-node.sh
set -u
IMAGE=${IMAGE:-localhost/prism-flwr/edge:cpu}
MEMORY=${MEMORY:-768m}
ROUNDS=${ROUNDS:-3}
W=${W:-/var/tmp/prism-edge/node-$MEMORY}; rm -rf "$W"; mkdir -p "$W/home" "$W/out" "$W/data"
APP=${APP:?the app directory (a copy of this repository)}
DATA=${DATA:-$W/data}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
V=$REPO/.venv/bin
cd "$W"  # Podman's conmon writes an empty file `oom` into its working directory at an OOM kill
free() { $V/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
LINK=$(free); N0=$(free); N1=$(free)
export FLWR_HOME=$W/home FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 PATH=$V:$PATH
printf '[superlink.edge]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$LINK" > "$W/home/config.toml"
echo "[$(date -u +%T)] host $(uname -m), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); SuperLink 127.0.0.1:$LINK; image $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
setsid $V/flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK" > "$W/superlink.log" 2>&1 & LP=$!
sleep 8
setsid $V/flower-supernode --insecure --superlink "127.0.0.1:$LINK" --host 127.0.0.1 --port "$N0" \
    --node-config "partition-id=0 num-partitions=2 data-dir='$DATA' state-dir='$W/state-0'" > "$W/supernode-host.log" 2>&1 & NP=$!
C=${NAME:-prism-edge-node}; podman rm -f $C >/dev/null 2>&1; podman volume rm -f $C-state >/dev/null 2>&1
podman run -d --name $C --network host --cpus 1 --memory $MEMORY --memory-swap $MEMORY \
    ${ENTRYPOINT:+--entrypoint "$ENTRYPOINT"} ${NODE_ENV:+-e "$NODE_ENV"} \
    -e FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    -v /usr/share/datasets/fashion-mnist:/usr/share/datasets/fashion-mnist:ro \
    -v $C-state:/app/.local/state/prism-flwr "$IMAGE" \
    --insecure --superlink "127.0.0.1:$LINK" --host 127.0.0.1 --port "$N1" \
    --node-config "partition-id=1 num-partitions=2" > /dev/null
echo "[$(date -u +%T)] container started: --cpus 1 --memory $MEMORY, $(podman image inspect --format '{{.Architecture}}' "$IMAGE"), entrypoint $(podman inspect --format '{{json .Config.Entrypoint}}' $C | cut -c1-120)"
(cd "$REPO" && $V/python -m benchmarks.node_memory --container $C > "$W/node-memory.txt" 2>&1) & MP=$!
for i in $(seq 1 90); do
    n=$($V/flwr supernode ls edge --format json 2>/dev/null | $V/python -c "import json,sys; print(sum(n.get('status')=='online' for n in json.load(sys.stdin).get('nodes',[])))" 2>/dev/null)
    [ "$n" = 2 ] && break; sleep 2
done
echo "[$(date -u +%T)] SuperNodes online: $n"
( while podman ps -q --filter name=$C | grep -q .; do podman stats --no-stream --format '{{.MemUsage}}' $C >> "$W/edge-mem.txt" 2>/dev/null; sleep 2; done ) & SP=$!
cd "$W/home"
t0=$(date +%s)
timeout 2400 $V/flwr run "$APP" edge --stream --run-config "num-server-rounds=$ROUNDS ${RUN_CONFIG:-} eval-feature-metrics=false min-train-nodes=2 download=false data-dir='$DATA' output-dir='$W/out'" > "$W/flwr-run.log" 2>&1
echo "[$(date -u +%T)] flwr run returned after $(( $(date +%s) - t0 )) s"
$V/flwr ls edge --format json | $V/python -c "import json,sys; r=max(json.load(sys.stdin)['runs'], key=lambda r: r['pending-at']); print('run status:', r['status'], r.get('status-details',''))"
cat "$W/out/latest/history.json" 2>/dev/null | $V/python -c "import json,sys; [print('round %d: clients %d, dropped %s' % (r['round'], r['clients'], r.get('dropped'))) for r in json.load(sys.stdin) if r['round']>=1]"
echo "--- edge container, peak of podman stats (sampled every 2 s): $(sort -h "$W/edge-mem.txt" | tail -1)"
d=$(ls -d /sys/fs/cgroup/memory/libpod_parent/libpod-$(podman inspect --format '{{.Id}}' $C) 2>/dev/null)
[ -n "$d" ] && echo "--- edge cgroup: max_usage $(( $(cat $d/memory.max_usage_in_bytes) / 1048576 )) MiB, limit $(( $(cat $d/memory.limit_in_bytes) / 1048576 )) MiB, failcnt $(cat $d/memory.failcnt), $(grep oom_kill $d/memory.oom_control | tr '\n' ' ')"
echo "--- podman inspect: OOMKilled=$(podman inspect --format '{{.State.OOMKilled}}' $C), running=$(podman inspect --format '{{.State.Running}}' $C)"
echo "--- the node's tasks"; podman logs $C 2>&1 | grep -E "warm executor\] task|Killed|MemoryError" | cut -c1-200
echo "--- edge node log (podman logs -t)"; podman logs -t $C 2>&1 | grep -vE "^\s*$" | tail -60
echo "--- flwr run log"; tail -40 "$W/flwr-run.log"
kill $SP 2>/dev/null; podman rm -f -t 2 $C >/dev/null; wait $MP
echo "--- the container's processes (benchmarks/node_memory.py, sampled every 0.5 s until it stopped)"; cat "$W/node-memory.txt"
podman volume rm -f $C-state >/dev/null
kill -- -$NP -$LP; sleep 3; kill -9 -- -$NP -$LP 2>/dev/null
echo "[$(date -u +%T)] done"
