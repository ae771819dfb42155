#!/usr/bin/env bash
# Build the deployment images and run a federation in containers on this machine, end to end:
#   base     Flower's images from Docker Hub, or stand-ins built from Debian's packages
#            (docker/debian.Dockerfile on a debootstrap root file system) when it is out of reach
#   build    the app images (docker/serverapp.Dockerfile, docker/clientapp.Dockerfile), CPU
#   certs    TLS certificates (docker/certs/generate.sh) and one ECDSA key per SuperNode
#   up       two private networks; SuperLink (TLS, SuperNode authentication, process isolation)
#            + ServerApp SuperExec on `control`, two SuperNodes + ClientApp SuperExecs on `fleet`,
#            fleet-proxy (nginx, Fleet API only) on both: SuperNodes reach the SuperLink only
#            through it; `flwr` runs in an operator container on `control`
#   run      `flwr run` of this repository (RUN_CONFIG), checked: finished:completed, model.prism
#   edge     (--edge) one edge.Dockerfile SuperNode held to --cpus 1 --memory 512m (768m when its torch
#            is a CUDA build: importing it takes about 540 MiB) for the default
#            run config (peak memory, seconds per round, start-up); then one held to
#            --memory 300m (OOM_MEMORY): its error must be logged and the run must go on
#   cuda     (--cuda) docker/clientapp-cuda.Dockerfile, built only
#   arm64    (--arm64) the edge image for linux/arm64 (docker/edge-site.Dockerfile), its packages
#            fetched natively for aarch64, built and smoke-run under qemu-user-static
# Prints the wall time of every stage; removes its containers, networks and volumes at the end
# (images stay: a second call reuses them). Runs with Docker when `docker info` answers, else
# with Podman (installed and configured here when run as root on Debian: runc, cgroupfs).
#
#   scripts/check-images.sh [--edge] [--cuda] [--arm64] [--keep] [--hub|--debian]
# Environment: ENGINE (docker|podman), RUN_CONFIG, EDGE_CONFIG, EDGE_MEMORY, OOM_MEMORY, TORCH_INDEX_URL,
# EDGE_TORCH_VERSION (the edge image's torch, e.g. 2.13.0+cpu from a wheel in pip's find-links),
# WORK (scratch directory, default /var/tmp/prism-check-images), FMNIST (Fashion-MNIST idx files),
# CPU_SHARES (Podman on a busy cgroup-v1 host: the containers' CPU weight, see stage up).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLWR_VERSION=1.42.0
P=prism-check                          # prefix of every container, network and volume made here
WORK=${WORK:-/var/tmp/prism-check-images}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
# eval-feature-metrics=false: the ServerApp would first train Fashion-MNIST's feature classifier
# (about an hour on 2 busy cores); download=false: the data comes from the read-only mount only.
RUN_CONFIG=${RUN_CONFIG:-num-server-rounds=2 local-steps=5 eval-samples=200 eval-feature-metrics=false download=false}
# The default run (3 rounds x 100 local steps, ngf 16) otherwise.
EDGE_CONFIG=${EDGE_CONFIG:-num-server-rounds=3 eval-feature-metrics=false download=false}
OOM_MEMORY=${OOM_MEMORY:-300m}
EDGE_MEMORY=${EDGE_MEMORY:-}  # set after the edge image is built: 512m for a CPU torch, else 768m
OOM_CONFIG=${OOM_CONFIG:-num-server-rounds=2 local-steps=5 eval-samples=200 eval-feature-metrics=false \
min-train-nodes=1 download=false}
# Flower's defaults, plus a SuperExec that looks for new tasks every 0.1 s (docker/gen-compose.py).
FLWR_ENV=(-e FLWR_DISABLE_UPDATE_CHECK=1 -e FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
          -e FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1)
CERTS=/app/certificates
DATA_MOUNT=(-v "$FMNIST:/usr/share/datasets/fashion-mnist:ro")
OUTPUTS=/app/prism-flwr/outputs

EDGE=0 CUDA=0 ARM64=0 KEEP=0 BASE=auto
for arg in "$@"; do
    case "$arg" in
        --edge) EDGE=1 ;;
        --cuda) CUDA=1 ;;
        --arm64) ARM64=1 ;;
        --keep) KEEP=1 ;;
        --hub) BASE=hub ;;
        --debian) BASE=debian ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
    esac
done

# ------------------------------------------------------------------------------------- stages
T0=$(date +%s.%N)
STAGES=()
stage_name="" stage_t0=""
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
stage() {
    stage_end
    stage_name=$1 stage_t0=$(date +%s.%N)
    log "=== stage $stage_name"
}
stage_end() {
    if [ -n "$stage_name" ]; then
        STAGES+=("$(printf '%-10s %8.1f s' "$stage_name" "$(echo "$(date +%s.%N) - $stage_t0" | bc)")")
        stage_name=""
    fi
}
report() {
    stage_end
    echo "--- wall time per stage (engine: ${ENGINE:-?}, $(nproc) CPUs, $(date -u +%FT%TZ))"
    printf '%s\n' "${STAGES[@]}"
    printf '%-10s %8.1f s\n' total "$(echo "$(date +%s.%N) - $T0" | bc)"
}
die() { log "FAILED: $*"; exit 1; }

# ------------------------------------------------------------------------------------- engine
setup_podman() {
    # Podman from Debian where nothing is installed; runc and cgroupfs where crun and systemd's
    # cgroup manager fail (containers started inside another container, hybrid cgroups).
    if ! command -v podman >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing podman and runc from Debian"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null
    fi
    command -v podman >/dev/null || die "neither a working docker nor podman"
    if [ "$(id -u)" = 0 ] && [ ! -e /etc/containers/containers.conf ]; then
        log "writing /etc/containers/containers.conf (runc, cgroupfs, no default ulimits)"
        mkdir -p /etc/containers
        printf '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
            > /etc/containers/containers.conf
    fi
}
if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
[ "$ENGINE" = podman ] && setup_podman
# Run from $WORK: Podman's conmon leaves an empty file `oom` in its working directory when a
# container is killed for memory (the OOM stage does that on purpose), never in the checkout.
E() { (mkdir -p "$WORK" && cd "$WORK" && "$ENGINE" "$@"); }
for tool in openssl ssh-keygen bc curl; do
    command -v "$tool" >/dev/null || die "$tool is needed (Debian: openssl openssh-client bc curl)"
done
[ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || die "no Fashion-MNIST in $FMNIST (Debian: apt-get install dataset-fashion-mnist)"

image_exists() { E image inspect "$1" >/dev/null 2>&1; }

remove_ours() {  # every container, network and volume named $P-* (a previous --keep run's too)
    local ids=()
    mapfile -t ids < <(E ps -aq --filter "name=^$P-" 2>/dev/null)
    local fast=(); [ "$ENGINE" = podman ] && fast=(-t 2)
    [ "${#ids[@]}" = 0 ] || E rm -f "${fast[@]}" "${ids[@]}" >/dev/null 2>&1 || true
    for net in control fleet; do E network rm "$P-$net" >/dev/null 2>&1 || true; done
    mapfile -t ids < <(E volume ls -q --filter "name=^$P-" 2>/dev/null)
    [ "${#ids[@]}" = 0 ] || E volume rm -f "${ids[@]}" >/dev/null 2>&1 || true
}
cleanup() {
    local rc=$?
    if [ "$KEEP" = 1 ]; then
        log "--keep: containers, networks and volumes $P-* left running (the next run removes them first)"
    else
        log "cleaning up containers, networks and volumes $P-*"
        remove_ours
    fi
    if [ -n "${OLD_SHARES:-}" ]; then echo "$OLD_SHARES" > "$SHARES_FILE" || true; fi
    report
    if [ "$rc" = 0 ]; then log "OK"; else log "exit status $rc"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
remove_ours  # a rerun after --keep starts from nothing, not from its volumes

# ------------------------------------------------------------------------------ pip settings
# A build's pip must reach the package index the way this host's pip does. Local directories in
# the host's pip configuration (file:// indexes, find-links, constraints, a proxy's CA bundle) are
# mounted read-only into Podman builds at the same paths; Docker builds get the URLs only.
# A file goes to the same path, or under $1 when given: a build that installs Debian's
# ca-certificates cannot have the host's bundle mounted over /etc/ssl/certs/ca-certificates.crt.
PIP_BUILD=()
pip_settings() {
    local files_at=${1:-} key value path py
    PIP_BUILD=()
    py=$(command -v python3 || true)
    [ -n "$py" ] || return 0
    while IFS='=' read -r key value; do
        value=${value#\'} value=${value%\'}
        key=${key##*.}
        case "$key" in
            index-url|extra-index-url|find-links|constraint|cert) ;;
            *) continue ;;
        esac
        local kept=()
        for path in $value; do
            local local_path=${path#file://}
            if [ -e "$local_path" ] && [[ "$path" == /* || "$path" == file://* ]]; then
                [ "$ENGINE" = podman ] || continue
                local mount=$local_path
                # a file:// "simple" index links to ../files: mount the folder above it
                [ "$(basename "$local_path")" = simple ] && mount=$(dirname "$local_path")
                if [ -f "$local_path" ] && [ -n "$files_at" ]; then
                    path=$files_at/$key-$(basename "$local_path")
                    PIP_BUILD+=(-v "$local_path:$path:ro")
                else
                    PIP_BUILD+=(-v "$mount:$mount:ro")
                fi
            fi
            kept+=("$path")
        done
        [ "${#kept[@]}" = 0 ] && continue
        local var
        var=PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')
        PIP_BUILD+=(--build-arg "$var=${kept[*]}")
    done < <("$py" -m pip config list 2>/dev/null | sort -u)
}

# ---------------------------------------------------------------------------------- stage: base
stage base
if [ "$BASE" = auto ]; then
    if image_exists docker.io/flwr/superexec:$FLWR_VERSION \
            || timeout 60 "$ENGINE" pull -q docker.io/flwr/superexec:$FLWR_VERSION >/dev/null 2>&1; then
        BASE=hub
    else
        BASE=debian
        log "Docker Hub is out of reach: base images from Debian's packages"
    fi
fi
if [ "$BASE" = hub ]; then
    SUPERLINK_IMAGE=docker.io/flwr/superlink:$FLWR_VERSION
    SUPERNODE_IMAGE=docker.io/flwr/supernode:$FLWR_VERSION
    SUPEREXEC_IMAGE=docker.io/flwr/superexec:$FLWR_VERSION
    PROXY_IMAGE=docker.io/library/nginx:1.27-bookworm
    PYTHON_IMAGE=docker.io/library/python:3.11-slim
    DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
    for image in "$SUPERLINK_IMAGE" "$SUPERNODE_IMAGE" "$PROXY_IMAGE"; do
        image_exists "$image" || E pull -q "$image" >/dev/null
    done
else
    DEBIAN_IMAGE=localhost/prism-flwr/debian:bookworm
    if ! image_exists "$DEBIAN_IMAGE"; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root (or import a Debian 12 root file system as $DEBIAN_IMAGE)"
        command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
        rootfs="$WORK/rootfs"
        rm -rf "$rootfs" && mkdir -p "$WORK"
        log "debootstrap --variant=minbase bookworm $rootfs"
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
            || die "debootstrap failed, see $WORK/debootstrap.log"
        rm -f "$rootfs"/var/cache/apt/archives/*.deb
        tar -C "$rootfs" -c . | E import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" >/dev/null
        rm -rf "$rootfs"
    fi
    SUPERLINK_IMAGE=localhost/prism-flwr/superlink:$FLWR_VERSION
    SUPERNODE_IMAGE=localhost/prism-flwr/supernode:$FLWR_VERSION
    SUPEREXEC_IMAGE=localhost/prism-flwr/superexec:$FLWR_VERSION
    PROXY_IMAGE=localhost/prism-flwr/fleet-proxy:bookworm
    PYTHON_IMAGE=localhost/prism-flwr/python:3.11-bookworm
fi
log "base: $BASE ($SUPEREXEC_IMAGE)"

# --------------------------------------------------------------------------------- stage: build
stage build
NET_BUILD=()
[ "$ENGINE" = podman ] && NET_BUILD=(--network host)
build() {  # build DOCKERFILE IMAGE [ARGS...]: a cached build is quick, so always run it
    local file=$1 image=$2
    shift 2
    log "build $image ($file $*)"
    E build "${NET_BUILD[@]}" "${PIP_BUILD[@]}" -f "$REPO/docker/$file" -t "$image" "$@" "$REPO" \
        > "$WORK/build-$(echo "$image" | tr '/:' '__').log" 2>&1 \
        || { tail -30 "$WORK/build-$(echo "$image" | tr '/:' '__').log"; die "build of $image"; }
}
mkdir -p "$WORK"
if [ "$BASE" = debian ]; then
    # python and fleet-proxy use no pip (and install ca-certificates): built before the pip settings.
    for target in python fleet-proxy superlink supernode superexec; do
        image=$SUPEREXEC_IMAGE
        case "$target" in
            superlink) image=$SUPERLINK_IMAGE ;; supernode) image=$SUPERNODE_IMAGE ;;
            fleet-proxy) image=$PROXY_IMAGE ;; python) image=$PYTHON_IMAGE ;;
        esac
        [ "$target" = superlink ] && pip_settings
        build debian.Dockerfile "$image" --target "$target" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
    done
fi
pip_settings
# The CPU torch index where it answers; otherwise PyPI's torch (on x86_64 a CUDA build, which
# runs on the CPU too but makes the images several GB larger).
if [ -z "${TORCH_INDEX_URL:-}" ]; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    if ! curl -fsS -m 20 -o /dev/null "$TORCH_INDEX_URL/torch/"; then
        TORCH_INDEX_URL=https://pypi.org/simple
        log "download.pytorch.org is out of reach: torch from PyPI ($TORCH_INDEX_URL)"
    fi
fi
APP_ARGS=(--build-arg "BASE_IMAGE=$SUPEREXEC_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
SERVERAPP_IMAGE=localhost/prism-flwr/serverapp:cpu
CLIENTAPP_IMAGE=localhost/prism-flwr/clientapp:cpu
EDGE_IMAGE=localhost/prism-flwr/edge:cpu
build serverapp.Dockerfile "$SERVERAPP_IMAGE" "${APP_ARGS[@]}"
build clientapp.Dockerfile "$CLIENTAPP_IMAGE" "${APP_ARGS[@]}"
if [ "$EDGE" = 1 ]; then
    build edge.Dockerfile "$EDGE_IMAGE" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
        --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" ${EDGE_TORCH_VERSION:+--build-arg "TORCH_VERSION=$EDGE_TORCH_VERSION"}
    edge_cuda=$(E run --rm --network none --entrypoint python "$EDGE_IMAGE" -c "import torch; print(torch.version.cuda)")
    [ -n "$EDGE_MEMORY" ] || { [ "$edge_cuda" = None ] && EDGE_MEMORY=512m || EDGE_MEMORY=768m; }
    log "edge image: torch's CUDA version $edge_cuda; the edge stage holds its node to $EDGE_MEMORY"
fi
E images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'prism-flwr|flwr/|nginx' | sort || true

# --------------------------------------------------------------------------------- stage: certs
stage certs
rm -rf "$WORK/certs" "$WORK/keys"
mkdir -p "$WORK/keys"
bash "$REPO/docker/certs/generate.sh" -o "$WORK/certs" localhost superlink fleet-proxy 127.0.0.1
NODES=(supernode-0 supernode-1)
[ "$EDGE" = 1 ] && NODES+=(supernode-edge supernode-oom)
for key in "${NODES[@]}"; do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$key" -f "$WORK/keys/$key"
done
# Keys go into volumes owned by the containers' user (uid 49999), one volume per container:
# each SuperNode sees only its own key; the SuperLink's volume holds the server key.
fill_volume() {  # fill_volume VOLUME FILE... (keys mode 0400, the rest 0444)
    local volume=$1
    shift
    E volume create "$volume" >/dev/null
    local mounts=() names=()
    for file in "$@"; do
        mounts+=(-v "$file:/src/$(basename "$file"):ro")
        names+=("$(basename "$file")")
    done
    # shellcheck disable=SC2016  # the script's "$@" and "$f" expand in the container's sh
    E run --rm --user 0 --network none "${mounts[@]}" -v "$volume:/dst" --entrypoint sh "$SUPEREXEC_IMAGE" -c \
        'for f in "$@"; do cp "/src/$f" "/dst/$f"; case "$f" in *.key) chmod 0400 "/dst/$f" ;; *) chmod 0444 "/dst/$f" ;; esac; done
         chown -R 49999:49999 /dst' sh "${names[@]}"
}
C="$WORK/certs"
fill_volume "$P-link-certs" "$C/ca.crt" "$C/server.pem" "$C/server.key"
fill_volume "$P-ca" "$C/ca.crt"
for key in "${NODES[@]}"; do
    cp "$WORK/keys/$key" "$WORK/keys/$key.key"
    fill_volume "$P-$key-key" "$C/ca.crt" "$WORK/keys/$key.key"
done

# ------------------------------------------------------------------------------------ stage: up
stage up
# On a busy cgroup-v1 host, Podman (cgroupfs) puts every container into ONE cgroup, libpod_parent,
# weighted like ONE host process: with N busy processes elsewhere the whole federation gets 1/N of
# the CPU, a ClientApp then needs more than 30 s to start, Flower's 30 s window for a task's first
# heartbeat expires ("Runtime task-token authentication failed") and the task is relaunched again
# and again. CPU_SHARES (e.g. 8192: one process's weight, 1024, per container) sets that weight for
# the run; it is restored at the end.
SHARES_FILE=/sys/fs/cgroup/cpu/libpod_parent/cpu.shares
if [ -n "${CPU_SHARES:-}" ] && [ "$ENGINE" = podman ] && [ -d /sys/fs/cgroup/cpu ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$(dirname "$SHARES_FILE")"
    OLD_SHARES=$(cat "$SHARES_FILE")
    echo "$CPU_SHARES" > "$SHARES_FILE"
    log "libpod_parent cpu.shares $OLD_SHARES -> $CPU_SHARES (restored at the end)"
fi
# --internal: no route out of either network, so nothing in a container downloads at run time.
E network create --internal "$P-control" >/dev/null
E network create --internal "$P-fleet" >/dev/null
E run -d --name "$P-superlink" --network "$P-control" --network-alias superlink "${FLWR_ENV[@]}" \
    -v "$P-link-certs:$CERTS:ro" "$SUPERLINK_IMAGE" \
    --isolation process --host 0.0.0.0 --port 8000 \
    --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth --disable-runtime-dependency-installation >/dev/null
E run -d --name "$P-serverapp" --network "$P-control" "${FLWR_ENV[@]}" -v "$P-ca:$CERTS:ro" \
    "${DATA_MOUNT[@]}" -v "$P-outputs:$OUTPUTS" "$SERVERAPP_IMAGE" \
    --root-certificates "$CERTS/ca.crt" --runtime-api-address superlink:8000 >/dev/null
# fleet-proxy: on both networks (a second network is joined before the container starts).
E create --name "$P-fleet-proxy" --network "$P-control" --network-alias fleet-proxy \
    -v "$REPO/docker/fleet-proxy/nginx-tls.conf:/etc/nginx/nginx.conf:ro" -v "$P-link-certs:/etc/nginx/certs:ro" \
    "$PROXY_IMAGE" >/dev/null
E network connect --alias fleet-proxy "$P-fleet" "$P-fleet-proxy"
E start "$P-fleet-proxy" >/dev/null

# The operator: `flwr` in a container on `control`, this repository mounted read-only at /src.
E run -d --name "$P-operator" --network "$P-control" "${FLWR_ENV[@]}" -v "$P-ca:$CERTS:ro" \
    -v "$REPO:/src:ro" -v "$WORK/keys:/keys:ro" --entrypoint sleep "$SERVERAPP_IMAGE" infinity >/dev/null
E exec "$P-operator" sh -c "mkdir -p /app/.flwr && printf '[superlink.containers]\naddress = \"superlink:8000\"\nroot-certificates = \"$CERTS/ca.crt\"\n' > /app/.flwr/config.toml"
flwr() { E exec -w /app "$P-operator" flwr "$@"; }
# JSON from `flwr ... --format json`, read by the operator's Python: json_get 'EXPR' (d = the reply)
json_get() { E exec -i "$P-operator" python -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -le "$end" ] || die "timed out after ${limit}s waiting for: $what"
        sleep 2
    done
}
superlink_up() { flwr ls containers --format json | json_get 'd.get("success") is True' | grep -qx True; }
wait_for 90 "SuperLink answers flwr ls" superlink_up
declare -A NODE_ID=()
for key in "${NODES[@]}"; do
    NODE_ID[$key]=$(flwr supernode register "/keys/$key.pub" containers --format json | json_get 'd["node-id"]')
    log "registered $key: node ${NODE_ID[$key]}"
done
online() { flwr supernode ls containers --format json | json_get 'sum(n.get("status") == "online" for n in d.get("nodes", []))'; }
wait_online() {  # wait_online N SECONDS: until exactly N SuperNodes are online
    local end=$((SECONDS + $2))
    until [ "$(online 2>/dev/null || echo -1)" = "$1" ]; do
        [ "$SECONDS" -le "$end" ] || die "timed out after $2 s waiting for $1 SuperNodes online"
        sleep 1
    done
}
start_pair() {  # start_pair I NUM_PARTITIONS: SuperNode i (process isolation) + its ClientApp SuperExec
    local i=$1 n=$2
    E run -d --name "$P-supernode-$i" --network "$P-fleet" --network-alias "supernode-$i" "${FLWR_ENV[@]}" \
        -v "$P-supernode-$i-key:/app/keys:ro" "$SUPERNODE_IMAGE" \
        --superlink fleet-proxy:9092 --root-certificates /app/keys/ca.crt \
        --auth-supernode-private-key "/app/keys/supernode-$i.key" \
        --isolation process --host 0.0.0.0 --port 9094 --node-config "partition-id=$i num-partitions=$n" >/dev/null
    E run -d --name "$P-clientapp-$i" --network "$P-fleet" "${FLWR_ENV[@]}" "${DATA_MOUNT[@]}" \
        -v "$P-outputs-$i:$OUTPUTS" --stop-signal SIGINT "$CLIENTAPP_IMAGE" \
        --insecure --runtime-api-address "supernode-$i:9094" >/dev/null
}
start_pair 0 2
start_pair 1 2
wait_online 2 120
log "2 SuperNodes online, through fleet-proxy"

# Through fleet-proxy the Control API is refused: the operator has only the `fleet` network's
# proxy address from a SuperNode's side, so ask from a SuperNode container.
code=$(E exec "$P-supernode-0" python -c "
import ssl, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile='/app/keys/ca.crt')
try:
    urllib.request.urlopen(urllib.request.Request('https://fleet-proxy:9092/v1/control/list-runs', data=b''), context=ctx, timeout=10)
    print(200)
except urllib.error.HTTPError as err:
    print(err.code)")
[ "$code" = 403 ] || die "fleet-proxy let a Control API call through (HTTP $code)"
log "fleet-proxy refuses the Control API from the fleet network (HTTP 403)"
if E exec "$P-supernode-0" python -c "import socket; socket.create_connection(('superlink', 8000), 5)" 2>/dev/null; then
    die "a SuperNode reaches the SuperLink directly"
fi
log "SuperNodes cannot resolve or reach the SuperLink directly"

# ----------------------------------------------------------------------------------- stage: run
submit() {  # submit RUN_CONFIG: flwr run (log: flwr-run-STAGE.log), then the run's final status
    local out="$WORK/flwr-run-${stage_name:-run}.log"
    flwr run /src containers --stream --run-config "$1" > "$out" 2>&1 || true
    tail -3 "$out" >&2
    flwr ls containers --format json | json_get 'max(d["runs"], key=lambda r: r["pending-at"])["status"]'
}
latest() { E exec "$P-serverapp" sh -c "cd $OUTPUTS/latest && $1"; }
history_rounds() {  # print one line per round of the newest run's history.json
    latest "cat history.json" \
        | json_get "'\n'.join('round %d: clients %d, dropped %s' % (r['round'], r['clients'], r['dropped']) for r in d if r['round'] >= 1)"
}
stage run
log "flwr run /src containers --run-config \"$RUN_CONFIG\""
status=$(submit "$RUN_CONFIG")
log "run status: $status"
[ "$status" = finished:completed ] || die "run ended $status (see $WORK/flwr-run-run.log; $ENGINE logs $P-serverapp)"
latest "test -s model.prism && ls -l model.prism history.json"
history_rounds
E logs "$P-serverapp" > "$WORK/serverapp.log" 2>&1 || true

# ---------------------------------------------------------------------------------- stage: edge
mem_sampler() {  # mem_sampler CONTAINER OUT: engine's memory figure every second while it runs
    while E stats --no-stream --format '{{.MemUsage}}' "$1" >> "$2" 2>/dev/null; do sleep 1; done
}
cgroup_dir() {  # the container's v1 memory cgroup (podman with cgroupfs, docker) or v2 cgroup
    local id
    id=$(E inspect --format '{{.Id}}' "$1")
    for d in /sys/fs/cgroup/memory/libpod_parent/libpod-"$id" /sys/fs/cgroup/memory/docker/"$id" \
             /sys/fs/cgroup/memory/system.slice/docker-"$id".scope /sys/fs/cgroup/libpod_parent/libpod-"$id" \
             /sys/fs/cgroup/system.slice/docker-"$id".scope; do
        [ -d "$d" ] && { echo "$d"; return; }
    done
}
cgroup_report() {  # peak memory (and OOM kills) from the cgroup, where this host shows it
    local d
    d=$(cgroup_dir "$1")
    [ -n "$d" ] || { echo "cgroup of $1 not found"; return; }
    if [ -f "$d/memory.max_usage_in_bytes" ]; then
        echo "cgroup v1 $d: max_usage $(( $(cat "$d/memory.max_usage_in_bytes") / 1048576 )) MiB" \
             "(page cache included), limit $(( $(cat "$d/memory.limit_in_bytes") / 1048576 )) MiB," \
             "failcnt $(cat "$d/memory.failcnt"), $(grep oom_kill "$d/memory.oom_control" | tr '\n' ' ')"
    elif [ -f "$d/memory.peak" ]; then
        echo "cgroup v2 $d: memory.peak $(( $(cat "$d/memory.peak") / 1048576 )) MiB, $(grep oom_kill "$d/memory.events")"
    fi
}
rss_sampler() {  # rss_sampler CONTAINER OUT: resident memory (rss, no page cache) every second
    local d
    d=$(cgroup_dir "$1")
    [ -n "$d" ] && [ -f "$d/memory.stat" ] || return 0
    while [ -f "$d/memory.stat" ]; do
        awk '$1 == "total_rss" {print int($2 / 1048576)}' "$d/memory.stat" >> "$2" 2>/dev/null || break
        sleep 1
    done
}
start_edge() {  # start_edge NAME KEY PARTITION MEMORY: one edge.Dockerfile container (its entrypoint: --warm)
    # state-dir (client state, privacy ledger) in a volume of its own, as on a device (docs/edge.md)
    E run -d --name "$P-$1" --network "$P-fleet" "${FLWR_ENV[@]}" "${DATA_MOUNT[@]}" \
        --cpus 1 --memory "$4" --memory-swap "$4" -v "$P-$2-key:/app/keys:ro" \
        -v "$P-$1-state:/app/.local/state/prism-flwr" "$EDGE_IMAGE" \
        --superlink fleet-proxy:9092 --root-certificates /app/keys/ca.crt \
        --auth-supernode-private-key "/app/keys/$2.key" --node-config "partition-id=$3 num-partitions=2" >/dev/null
}
round_times() {  # seconds between the ServerApp's "[ROUND i/n]" lines and to the end of the run
    E logs -t "$P-serverapp" 2>&1 | awk '/\[ROUND [0-9]+\/[0-9]+\]|Run finished/ {print $1, $NF}' | tail -n "$1"
}
if [ "$EDGE" = 1 ]; then
    stage edge
    E rm -f "$P-supernode-0" "$P-clientapp-0" >/dev/null
    wait_online 1 120
    t_start=$(date +%s.%N)
    start_edge edge supernode-edge 0 "$EDGE_MEMORY"
    wait_online 2 180
    online_at=$(flwr supernode ls containers --format json \
        | json_get "[n['online-at'] for n in d['nodes'] if n['node-id'] == '${NODE_ID[supernode-edge]}'][0]")
    startup=$(echo "$(date -u -d "${online_at%Z}" +%s) - $t_start" | bc)
    log "edge node (--cpus 1 --memory $EDGE_MEMORY) online ${startup} s after its container was started" \
        "(the SuperLink's online-at, whole seconds: $online_at)"
    : > "$WORK/edge-stats.txt"; : > "$WORK/edge-rss.txt"
    mem_sampler "$P-edge" "$WORK/edge-stats.txt" & sampler=$!
    rss_sampler "$P-edge" "$WORK/edge-rss.txt" & rss=$!
    log "flwr run /src containers --run-config \"$EDGE_CONFIG\" (3 rounds, the default run otherwise)"
    status=$(submit "$EDGE_CONFIG")
    kill "$sampler" "$rss" 2>/dev/null || true
    log "edge run status: $status"
    round_times 4
    E logs -t "$P-edge" 2>&1 | grep -E 'Receiving: train|Sending: train' || true
    cgroup_report "$P-edge"
    echo "peak resident memory (cgroup total_rss, sampled every 1 s): $(sort -n "$WORK/edge-rss.txt" | tail -1) MiB"
    echo "peak of $ENGINE stats (sampled): $(sort -h "$WORK/edge-stats.txt" | tail -1)"
    history_rounds
    E logs "$P-edge" > "$WORK/edge.log" 2>&1 || true
    [ "$status" = finished:completed ] || die "edge run ended $status"

    stage oom
    E rm -f "$P-edge" >/dev/null
    wait_online 1 120
    start_edge oom supernode-oom 0 "$OOM_MEMORY"
    wait_online 2 180
    log "node held to --memory $OOM_MEMORY online; flwr run --run-config \"$OOM_CONFIG\""
    status=$(submit "$OOM_CONFIG")
    log "run status with the starved node: $status"
    cgroup_report "$P-oom"
    E logs -t "$P-oom" 2>&1 | tail -20 > "$WORK/oom-node.log" || true
    E logs "$P-serverapp" 2>&1 | grep -iE 'dropped|error|stopped responding' | tail -10 || true
    history_rounds
    [ "$status" = finished:completed ] || die "the run did not go on without the starved node ($status)"
    latest "cat history.json" | json_get 'any(r["dropped"] for r in d)' | grep -qx True \
        || die "no round records the starved node's failure"
fi

# ---------------------------------------------------------------------------- stage: cuda, arm64
if [ "$CUDA" = 1 ]; then
    stage cuda
    cuda_base=nvidia/cuda:12.8.1-base-ubuntu24.04
    [ "$BASE" = debian ] && cuda_base=$DEBIAN_IMAGE   # the torch wheels bring their CUDA runtime
    pip_settings /opt/pip-build                       # its apt-get installs ca-certificates
    build clientapp-cuda.Dockerfile localhost/prism-flwr/clientapp:cuda --build-arg "CUDA_BASE=$cuda_base" \
        --build-arg TORCH_INDEX_URL=https://pypi.org/simple
    E run --rm --network none --entrypoint python localhost/prism-flwr/clientapp:cuda -c \
        "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda, 'GPU visible', torch.cuda.is_available())"
fi
if [ "$ARM64" = 1 ]; then
    # The edge image for linux/arm64 (docker/edge-site.Dockerfile): its packages fetched and unpacked
    # natively by this host's pip for aarch64, emulation (qemu-user-static through binfmt_misc)
    # only for the image's few RUN steps and for running it.
    stage arm64
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
        || die "no binfmt_misc entry for aarch64: apt-get install qemu-user-static binfmt-support (and mount binfmt_misc)"
    arm_base=docker.io/library/python:3.11-slim
    if [ "$BASE" = debian ]; then
        arm_base=localhost/prism-flwr/python:3.11-bookworm-arm64
        if ! image_exists "$arm_base"; then
            rootfs="$WORK/rootfs-arm64"
            rm -rf "$rootfs"
            log "debootstrap --arch=arm64 --variant=minbase bookworm $rootfs, with python3 (second stage emulated)"
            debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
                bookworm "$rootfs" http://deb.debian.org/debian > "$WORK/debootstrap-arm64.log" 2>&1 \
                || die "debootstrap failed, see $WORK/debootstrap-arm64.log"
            rm -f "$rootfs"/var/cache/apt/archives/*.deb
            tar -C "$rootfs" -c . | E import --arch arm64 --change 'CMD ["/bin/bash"]' - "$arm_base" >/dev/null
            rm -rf "$rootfs"
        fi
    fi
    site="$WORK/site-arm64"
    # fetched again when the client requirements change (the marker holds their digest)
    want="$(sha256sum "$REPO/docker/client-requirements.txt" | cut -d' ' -f1) torch==${ARM64_TORCH:-2.9.1}"
    if [ "$(cat "$site/.complete" 2>/dev/null)" != "$want" ]; then
        rm -rf "$site"
        plat=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version 3.11
              --implementation cp --abi cp311 --only-binary=:all: --no-cache-dir)
        # torch's nvidia requirements are marked for x86_64, which pip evaluates for this host: --no-deps,
        # and its own requirements named; PyPI's aarch64 torch is CPU-only up to 2.9.1.
        log "pip install --platform manylinux_2_28_aarch64 --target $site torch==${ARM64_TORCH:-2.9.1} + docker/client-requirements.txt"
        python3 -m pip install -q "${plat[@]}" --target "$site" --no-deps "torch==${ARM64_TORCH:-2.9.1}" \
            > "$WORK/pip-arm64.log" 2>&1 || die "pip (torch for aarch64) failed, see $WORK/pip-arm64.log"
        # markers are evaluated for this host too: opacus (requires torch) goes in with --no-deps, and
        # constriction has no aarch64 wheel (an arm64 node runs uplink-coding = "raw")
        grep -vE '^(constriction|opacus)' "$REPO/docker/client-requirements.txt" > "$WORK/client-requirements-arm64.txt"
        python3 -m pip install -q "${plat[@]}" --target "$site.deps" -r "$WORK/client-requirements-arm64.txt" \
            filelock typing-extensions sympy networkx jinja2 fsspec scipy opt_einsum >> "$WORK/pip-arm64.log" 2>&1 \
            || die "pip (client requirements for aarch64) failed, see $WORK/pip-arm64.log"
        python3 -m pip install -q "${plat[@]}" --target "$site.deps" --no-deps opacus >> "$WORK/pip-arm64.log" 2>&1 \
            || die "pip (opacus for aarch64) failed, see $WORK/pip-arm64.log"
        cp -an "$site.deps/." "$site/" && rm -rf "$site.deps"
        # as edge.Dockerfile does: torch's headers, tests and test binaries are not needed to run it
        rm -rf "$site/torch/include" "$site/torch/test"
        find "$site/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
        echo "$want" > "$site/.complete"
    fi
    rm -rf "$REPO/.edge-site/site" && mkdir -p "$REPO/.edge-site"
    cp -al "$site" "$REPO/.edge-site/site" 2>/dev/null || cp -a "$site" "$REPO/.edge-site/site"
    build edge-site.Dockerfile localhost/prism-flwr/edge:arm64 --platform linux/arm64 --build-arg "PYTHON_IMAGE=$arm_base"
    rm -rf "$REPO/.edge-site"
    E run --rm --platform linux/arm64 --network none --entrypoint python localhost/prism-flwr/edge:arm64 \
        -c "import platform, torch, flwr, client_app; print('arm64 edge image:', platform.machine(), 'torch', torch.__version__, 'flwr', flwr.__version__)"
fi
stage_end
