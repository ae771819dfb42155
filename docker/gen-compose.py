#!/usr/bin/env python3
"""Write a Docker Compose file: one SuperLink + N SuperNodes, Flower 1.42, process isolation.

    python docker/gen-compose.py                        > docker/compose.yaml   (2 nodes, insecure, CPU)
    python docker/gen-compose.py --nodes 8 --tls --auth > docker/compose.8.yaml
    python docker/gen-compose.py --nodes 4 --gpu        > docker/compose.gpu.yaml

    python docker/gen-compose.py --proxy-conf [--tls] > docker/fleet-proxy/nginx[-tls].conf

Services (one host; docs/deployment.md splits them over machines), on two networks:
  superlink              flwr/superlink: Fleet + Control + Runtime API on one HTTP(S) port, 8000,
                         on the private network "control" only; published on the host's
                         127.0.0.1:8000 for the operator's `flwr` (Control API), never beyond
  superexec-serverapp    this app's ServerApp image; runs ServerApps for the SuperLink ("control")
  fleet-proxy            nginx (official image) on both networks: forwards ONLY the Fleet API
                         (POST /v1/fleet/..., and GET /health) to superlink:8000 and answers 403 to
                         everything else (Control API /v1/control/..., Runtime API /v1/runtime/...);
                         port 9092, published on 127.0.0.1 without --tls, on all interfaces with it
  supernode-<i>          flwr/supernode with --node-config "partition-id=<i> num-partitions=N",
                         --superlink fleet-proxy:9092 (network "fleet": it cannot reach superlink)
  superexec-clientapp-<i>  this app's ClientApp image (CPU, or CUDA with --gpu); runs ClientApps
                         for supernode-<i> over its Runtime API (supernode-<i>:9094)
Volumes: prism-data (datasets, = run-config data-dir ~/.cache/prism-flwr/data in the images),
prism-outputs (ServerApp output-dir) and prism-state-<i> (each node's state-dir: client state and
the privacy ledger, which must outlive the container or the node's DP budget would start afresh).
Without --tls everything is plain HTTP and every published port binds 127.0.0.1: for trying it
on one machine only. WARNING: insecure; never expose it.
--tls   SuperLink and fleet-proxy serve HTTPS with docker/certs/out/{ca.crt,server.pem,server.key}
        (docker/certs/generate.sh, whose default SANs include superlink and fleet-proxy); the
        proxy verifies the SuperLink with ca.crt, SuperNodes and the ServerApp SuperExec too.
--auth  SuperNode authentication: supernode-<i> signs with docker/keys/supernode-<i> (ssh-keygen -t
        ecdsa -b 384); register each .pub first: flwr supernode register docker/keys/supernode-<i>.pub CONN
--gpu   ClientApp SuperExecs from clientapp-cuda.Dockerfile with all GPUs reserved (NVIDIA
        Container Toolkit); run-config device=auto then picks CUDA.
Only the Python standard library is used, so this runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

FLWR_VERSION = "1.42.0"
LINK_PORT = 8000  # SuperLink HTTP(S) port (1.42 default)
PROXY_PORT = 9092  # fleet-proxy: the Fleet API only (9092 was the Fleet API's own port before 1.42)
NGINX_IMAGE = "nginx:1.27-bookworm"
# The Fleet API's routes in Flower 1.42: flwr/supernode/fleet_http_client.py posts to /v1/fleet/<rpc>
# (register-node, activate-node, pull-messages, push-messages, get-run, get-fab, push-object,
# pull-object, ...); the SuperLink mounts them under the same prefix (flwr/superlink/routers/fleet).
FLEET_PREFIX = "/v1/fleet/"
NODE_PORT = 9094  # SuperNode Runtime API port (1.42 default); each node is its own container
DATA = "/app/.cache/prism-flwr/data"  # default run-config data-dir under the images' HOME=/app
OUTPUTS = "/app/prism-flwr/outputs"  # default run-config output-dir ~/prism-flwr/outputs, HOME=/app
STATE = "/app/.local/state/prism-flwr"  # default node-config state-dir ~/.local/state/prism-flwr, HOME=/app
CERTS = "/app/certificates"
# SuperExec looks for a new task (a round's ClientApp or the ServerApp) every second by default;
# every 0.1 s a round's ClientApps start up to 0.9 s sooner (one local request per poll).
ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def build(dockerfile: str, image: str) -> dict:
    return {"build": {"context": "..", "dockerfile": f"docker/{dockerfile}"}, "image": image}


def nginx_conf(
    tls: bool,
    listen: str = str(PROXY_PORT),
    upstream: str = f"superlink:{LINK_PORT}",
    certs: str = "/etc/nginx/certs",
    main: str = "",
) -> str:
    """nginx configuration of fleet-proxy: the Fleet API passes, everything else gets 403.

    ``main`` adds top-level directives (the tests run it as a foreground process on loopback).
    Location matching works on nginx's normalised URI, and ``proxy_pass`` with a URI part sends
    that normalised URI upstream: ``/v1/fleet/../control/...`` is a Control call and is refused.
    """
    scheme = "https" if tls else "http"
    upstream_tls = (
        f"            proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {certs}/ca.crt;\n"
        f"            proxy_ssl_name {upstream.rsplit(':', 1)[0]};\n            proxy_ssl_server_name on;\n"
        if tls
        else ""
    )
    server_tls = (
        f"        ssl_certificate {certs}/server.pem;\n        ssl_certificate_key {certs}/server.key;\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        if tls
        else ""
    )
    args = " --tls" if tls else ""
    return f"""# Generated by: python docker/gen-compose.py --proxy-conf{args}
# fleet-proxy: Flower 1.42 serves the Fleet API (SuperNodes), the Control API (flwr run/ls/stop,
# supernode register) and the Runtime API (ServerApps) on ONE port, and the community edition
# has no Control API authentication. SuperNodes reach the SuperLink only through this proxy,
# which forwards POST {FLEET_PREFIX}... and GET /health and answers 403 to everything else.
{main}worker_processes 1;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    server_tokens off;
    client_max_body_size 64m;   # Flower sends arrays in chunks of at most 5 MiB
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    server {{
        listen {listen}{" ssl" if tls else ""};
{server_tls}        location {FLEET_PREFIX} {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass {scheme}://{upstream}{FLEET_PREFIX};
            proxy_set_header Host $http_host;
{upstream_tls}        }}
        location = /health {{
            proxy_pass {scheme}://{upstream}/health;
{upstream_tls}        }}
        location / {{
            return 403;
        }}
    }}
}}
"""


def compose(nodes: int, tls: bool, auth: bool, gpu: bool) -> dict:
    version = "${FLWR_VERSION:-" + FLWR_VERSION + "}"
    security = [] if tls else ["--insecure"]
    link_cmd = [*security, "--isolation", "process", "--host", "0.0.0.0", "--port", str(LINK_PORT)]
    # The Control API stays on the host's loopback (the operator's `flwr`); SuperNodes use fleet-proxy.
    link: dict = {
        "image": f"flwr/superlink:{version}",
        "command": link_cmd,
        "environment": ENV,
        "ports": [f"127.0.0.1:{LINK_PORT}:{LINK_PORT}"],
        "networks": ["control"],
        "restart": "unless-stopped",
    }
    secrets: dict = {}
    if tls:
        link_cmd += [
            "--ssl-ca-certfile",
            f"{CERTS}/ca.crt",
            "--ssl-certfile",
            f"{CERTS}/server.pem",
            "--ssl-keyfile",
            f"{CERTS}/server.key",
        ]
        link["secrets"] = [
            {"source": s, "target": f"{CERTS}/{f}"}
            for s, f in (("ca-crt", "ca.crt"), ("server-pem", "server.pem"), ("server-key", "server.key"))
        ]
        secrets.update(
            {
                "ca-crt": {"file": "certs/out/ca.crt"},
                "server-pem": {"file": "certs/out/server.pem"},
                "server-key": {"file": "certs/out/server.key"},
            }
        )
    if auth:
        link_cmd.append("--enable-supernode-auth")
    ca = [{"source": "ca-crt", "target": f"{CERTS}/ca.crt"}] if tls else []
    proxy: dict = {
        "image": NGINX_IMAGE,
        "volumes": [f"./fleet-proxy/nginx{'-tls' if tls else ''}.conf:/etc/nginx/nginx.conf:ro"],
        # without TLS: loopback only (WARNING: plain HTTP, for one machine); with TLS: remote SuperNodes
        "ports": [f"{'' if tls else '127.0.0.1:'}{PROXY_PORT}:{PROXY_PORT}"],
        "networks": ["control", "fleet"],
        "restart": "unless-stopped",
        "depends_on": ["superlink"],
    }
    if tls:
        proxy["secrets"] = [
            {"source": s, "target": f"/etc/nginx/certs/{f}"}
            for s, f in (("ca-crt", "ca.crt"), ("server-pem", "server.pem"), ("server-key", "server.key"))
        ]

    server_exec = {
        **build("serverapp.Dockerfile", "prism-flwr/serverapp:cpu"),
        "command": [
            *(["--root-certificates", f"{CERTS}/ca.crt"] if tls else ["--insecure"]),
            "--runtime-api-address",
            f"superlink:{LINK_PORT}",
        ],
        "environment": ENV,
        "volumes": [f"prism-data:{DATA}", f"prism-outputs:{OUTPUTS}"],
        "networks": ["control"],
        "restart": "on-failure",
        "depends_on": ["superlink"],
    }
    if ca:
        server_exec["secrets"] = ca
    services = {"superlink": link, "superexec-serverapp": server_exec, "fleet-proxy": proxy}
    volumes: dict = {"prism-data": {}, "prism-outputs": {}}

    for i in range(nodes):
        node_cmd = [
            *security,
            "--superlink",
            f"fleet-proxy:{PROXY_PORT}",
            "--isolation",
            "process",
            "--host",
            "0.0.0.0",
            "--port",
            str(NODE_PORT),
            "--node-config",
            f"partition-id={i} num-partitions={nodes}",
        ]
        node: dict = {
            "image": f"flwr/supernode:{version}",
            "command": node_cmd,
            "environment": ENV,
            "networks": ["fleet"],
            "restart": "on-failure",
            "depends_on": ["fleet-proxy"],
        }
        node_secrets = list(ca)
        if tls:
            node_cmd += ["--root-certificates", f"{CERTS}/ca.crt"]
        if auth:
            node_cmd += ["--auth-supernode-private-key", "/app/keys/supernode.key"]
            node_secrets.append({"source": f"supernode-{i}-key", "target": "/app/keys/supernode.key"})
            secrets[f"supernode-{i}-key"] = {"file": f"keys/supernode-{i}"}
        if node_secrets:
            node["secrets"] = node_secrets
        services[f"supernode-{i}"] = node

        exe = {
            **(
                build("clientapp-cuda.Dockerfile", "prism-flwr/clientapp:cuda")
                if gpu
                else build("clientapp.Dockerfile", "prism-flwr/clientapp:cpu")
            ),
            # The Runtime API stays on the Compose network (no `ports:`), so plain HTTP here.
            "command": ["--insecure", "--runtime-api-address", f"supernode-{i}:{NODE_PORT}"],
            "environment": ENV,
            "volumes": [f"prism-data:{DATA}", f"prism-state-{i}:{STATE}"],
            "networks": ["fleet"],
            "stop_signal": "SIGINT",
            "restart": "on-failure",
            "depends_on": [f"supernode-{i}"],
        }
        if gpu:
            exe["deploy"] = {
                "resources": {
                    "reservations": {
                        "devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
                    }
                }
            }
        services[f"superexec-clientapp-{i}"] = exe
        volumes[f"prism-state-{i}"] = {}

    spec: dict = {
        "name": "prism-flwr",
        "services": services,
        "volumes": volumes,
        "networks": {"control": {}, "fleet": {}},
    }
    if secrets:
        spec["secrets"] = secrets
    return spec


# ---------------------------------------------------------------------- a small YAML emitter
_PLAIN = re.compile(r"^[A-Za-z_/$][A-Za-z0-9_./:${}=-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED and ": " not in text:
        return text
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar


def _emit(value: object, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict) and item or isinstance(item, list) and item:
                out.append(f"{pad}{key}:")
                _emit(item, indent + 1, out)
            elif isinstance(item, (dict, list)):
                out.append(f"{pad}{key}: {{}}" if isinstance(item, dict) else f"{pad}{key}: []")
            else:
                out.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                lines: list[str] = []
                _emit(item, indent + 1, lines)
                out.append(f"{pad}- {lines[0].lstrip()}")
                out.extend(lines[1:])
            else:
                out.append(f"{pad}- {_scalar(item)}")


def to_yaml(spec: dict, argv: list[str]) -> str:
    args = " ".join(argv)
    header = [
        f"# Generated by: python docker/gen-compose.py{' ' + args if args else ''}",
        "# Edit docker/gen-compose.py, not this file (tests/test_deployment.py checks they agree).",
        "# Keep it in docker/: relative paths (build context, certs/, keys/) are resolved from there.",
        "# Start:  docker compose -f docker/<this file> up --build -d",
        "# Run:    flwr run . docker   (connection in $FLWR_HOME/config.toml, see docs/deployment.md)",
    ]
    if "--tls" not in argv:
        header.append(
            "# WARNING: insecure (plain HTTP, no SuperNode authentication): every port binds 127.0.0.1;"
            " use --tls --auth beyond one machine."
        )
    out: list[str] = []
    _emit(spec, 0, out)
    return "\n".join(header + out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default 2)")
    ap.add_argument(
        "--tls", action="store_true", help="HTTPS SuperLink (certs from docker/certs/generate.sh)"
    )
    ap.add_argument("--auth", action="store_true", help="SuperNode authentication (keys in docker/keys/)")
    ap.add_argument("--gpu", action="store_true", help="CUDA ClientApp images with the GPUs reserved")
    ap.add_argument("--proxy-conf", action="store_true", help="print fleet-proxy's nginx.conf instead")
    args = ap.parse_args(argv)
    if args.nodes < 1:
        ap.error("--nodes must be at least 1")
    if args.proxy_conf:
        sys.stdout.write(nginx_conf(args.tls))
        return 0
    sys.stdout.write(to_yaml(compose(args.nodes, args.tls, args.auth, args.gpu), argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
