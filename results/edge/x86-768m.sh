#!/usr/bin/env bash
# 3 rounds of the default run config with one x86_64 edge container held to 768 MiB; a mixed federation on this x86_64 host: SuperLink (x86_64, host process), SuperNode 0 (x86_64,
# host process), SuperNode 1 = the arm64 edge image under qemu-user-static emulation, held to
# --cpus 1 --memory 512m, with its state-dir in a volume. One round, then the run's status.
set -u
W=/var/tmp/prism-edge/x86-768m; rm -rf "$W"; mkdir -p "$W/home" "$W/out"
V=/work/main/.venv/bin
free() { $V/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
LINK=$(free); N0=$(free); N1=$(free)
export FLWR_HOME=$W/home FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 PATH=$V:$PATH
printf '[superlink.mixed]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$LINK" > "$W/home/config.toml"
echo "[$(date -u +%T)] host $(uname -m), $(nproc) CPUs; SuperLink 127.0.0.1:$LINK"
setsid $V/flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK" > "$W/superlink.log" 2>&1 & LP=$!
sleep 8
setsid $V/flower-supernode --insecure --superlink "127.0.0.1:$LINK" --host 127.0.0.1 --port "$N0" \
    --node-config "partition-id=0 num-partitions=2 data-dir='/var/tmp/edge-data' state-dir='$W/state-0'" > "$W/supernode-x86.log" 2>&1 & NP=$!
podman rm -f prism-edge-x86 >/dev/null 2>&1; podman volume rm -f prism-edge-x86-state >/dev/null 2>&1
podman run -d --name prism-edge-x86 --network host --cpus 1 --memory 768m --memory-swap 768m \
    -e FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    -v /usr/share/datasets/fashion-mnist:/usr/share/datasets/fashion-mnist:ro \
    -v prism-edge-x86-state:/app/.local/state/prism-flwr localhost/prism-flwr/edge:cpu \
    --insecure --superlink "127.0.0.1:$LINK" --host 127.0.0.1 --port "$N1" \
    --node-config "partition-id=1 num-partitions=2" > /dev/null
echo "[$(date -u +%T)] x86_64 CPU-torch container (--cpus 1 --memory 768m) started: $(podman inspect --format '{{.Architecture}} {{.Os}}' localhost/prism-flwr/edge:cpu)"
for i in $(seq 1 90); do
    n=$($V/flwr supernode ls mixed --format json 2>/dev/null | $V/python -c "import json,sys; print(sum(n.get('status')=='online' for n in json.load(sys.stdin).get('nodes',[])))" 2>/dev/null)
    [ "$n" = 2 ] && break; sleep 2
done
echo "[$(date -u +%T)] SuperNodes online: $n"
( while podman ps -q --filter name=prism-edge-x86 | grep -q .; do podman stats --no-stream --format '{{.MemUsage}}' prism-edge-x86 >> "$W/edge-mem.txt" 2>/dev/null; sleep 2; done ) & SP=$!
cd "$W/home"
t0=$(date +%s)
timeout 2400 $V/flwr run "$APP" mixed --stream --run-config "num-server-rounds=3 eval-feature-metrics=false min-train-nodes=2 download=false data-dir='/var/tmp/edge-data' output-dir='$W/out'" > "$W/flwr-run.log" 2>&1
echo "[$(date -u +%T)] flwr run returned after $(( $(date +%s) - t0 )) s"
$V/flwr ls mixed --format json | $V/python -c "import json,sys; r=max(json.load(sys.stdin)['runs'], key=lambda r: r['pending-at']); print('run status:', r['status'], r.get('status-details',''))"
cat "$W/out/latest/history.json" 2>/dev/null | $V/python -c "import json,sys; [print('round %d: clients %d, dropped %s' % (r['round'], r['clients'], r.get('dropped'))) for r in json.load(sys.stdin) if r['round']>=1]"
echo "--- x86 edge node, peak of podman stats (sampled every 2 s): $(sort -h "$W/edge-mem.txt" | tail -1)"
d=$(ls -d /sys/fs/cgroup/memory/libpod_parent/libpod-$(podman inspect --format '{{.Id}}' prism-edge-x86) 2>/dev/null)
[ -n "$d" ] && echo "--- x86 edge cgroup: max_usage $(( $(cat $d/memory.max_usage_in_bytes) / 1048576 )) MiB, limit $(( $(cat $d/memory.limit_in_bytes) / 1048576 )) MiB, failcnt $(cat $d/memory.failcnt), $(grep oom_kill $d/memory.oom_control | tr '\n' ' ')"
echo "--- x86 edge node log (podman logs -t)"; podman logs -t prism-edge-x86 2>&1 | tail -60
echo "--- flwr run log"; tail -40 "$W/flwr-run.log"
kill $SP 2>/dev/null; podman rm -f -t 2 prism-edge-x86 >/dev/null; podman volume rm -f prism-edge-x86-state >/dev/null
kill -- -$NP -$LP; sleep 3; kill -9 -- -$NP -$LP 2>/dev/null
echo "[$(date -u +%T)] done"
