"""``prism-flwr`` command line: data preparation, sampling from an exported model, run status.

prism-flwr data cifar10 [--data-dir DIR] [--download auto|true|false]   prepare / check a dataset
prism-flwr sample MODEL.prism [--n 64] [--out grid.png] [--seed 0]
prism-flwr evaluate MODEL.prism [--dataset fmnist] [--n 10000] [--inception-weights FILE]
prism-flwr feature-net fmnist [--seed 0] [--force]     train (once) the FD feature classifier
prism-flwr last-run [CONNECTION]                       status of the newest `flwr run`
prism-flwr clientapp-executor --runtime-api-address HOST:PORT --insecure   warm ClientApp process
prism-flwr supernode [--idle-poll 0.2] [--warm] -- FLOWER-SUPERNODE-ARGS...   SuperNode, checked apps
prism-flwr clientapp FLWR-CLIENTAPP-ARGS...           flwr-clientapp that runs only the node's trusted-apps
prism-flwr sign-app [APP] --key publisher.pem          sign an app for the nodes' trusted-app-keys
prism-flwr secagg-keys --nodes N --out DIR             signing keys + roster for secure aggregation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import get_args

from prism_flwr.config import RunConfig

# torch is imported by the commands that use it, not here: `prism-flwr supernode` runs beside a
# node's ClientApps and stays small
DATASETS = get_args(RunConfig.model_fields["dataset"].annotation)


def _user_error(err: Exception) -> bool:
    """A missing dataset or a bad model file: its message is the whole story, no traceback."""
    from prism_flwr.data.datasets import DatasetMissingError
    from prism_flwr.federated.export import ModelFileError

    return isinstance(err, DatasetMissingError | ModelFileError)


def _data(args: argparse.Namespace) -> int:
    from prism_flwr.data.datasets import load_dataset

    data = load_dataset(args.dataset, args.data_dir, train=True, download=args.download)
    print(
        f"{args.dataset}: {len(data)} training images {tuple(data.images.shape[1:])} ready in {args.data_dir}"
    )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from prism_flwr.evaluation.evaluator import save_grid
    from prism_flwr.federated.export import load_sparse_model
    from prism_flwr.model.generator import generate

    model, header = load_sparse_model(args.model)
    save_grid(generate(model, args.n, args.seed), args.out)
    print(f"{args.n} samples of {args.model} ({header['generator']}) -> {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from prism_flwr.evaluation.evaluator import Evaluator
    from prism_flwr.federated.export import load_sparse_model
    from prism_flwr.model.build import pick_device

    model, header = load_sparse_model(args.model)
    dataset = args.dataset or header.get("dataset")
    if dataset is None:
        print(f"{args.model} does not name its dataset: pass --dataset", file=sys.stderr)
        return 2
    evaluator = Evaluator(
        dataset,
        args.data_dir,
        args.n,
        args.seed,
        pick_device(args.device),
        inception_weights=args.inception_weights or None,
    )
    metrics, _ = evaluator.evaluate(model, mask_mode="threshold")  # the stored mask, as exported
    result = {
        "model": args.model,
        "dataset": dataset,
        "n": evaluator.n,
        "features": evaluator.feature_info,
        **metrics,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _feature_net(args: argparse.Namespace) -> int:
    from prism_flwr.evaluation.feature_net import load_or_train_classifier
    from prism_flwr.model.build import pick_device

    _, info, path = load_or_train_classifier(
        args.dataset, args.data_dir, args.seed, pick_device(args.device), args.download, force=args.force
    )
    print(f"{path}: test accuracy {info['test_accuracy']:.4f} ({info['train_seconds']:.0f} s of training)")
    return 0


def _last_run(args: argparse.Namespace) -> int:
    """Flower's `flwr run` exits 0 even when the ServerApp raised: read the run's own status."""
    out = subprocess.run(
        ["flwr", "ls", *([args.connection] if args.connection else []), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        print(f"could not read `flwr ls`: {out.stdout or out.stderr}", file=sys.stderr)
        return 2
    last = max(runs, key=lambda r: r["pending-at"])
    print(
        f"run {last['run-id']}: {last['status']}"
        + (f" ({last['status-details']})" if last["status-details"] != "N/A" else "")
    )
    return 0 if last["status"] == "finished:completed" else 1


def _poll_seconds(text: str) -> float:
    value = float(text)
    if not 0.01 <= value <= 60:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: give seconds between 0.01 and 60")
    return value


def _clientapp_executor(args: argparse.Namespace) -> int:
    """One warm ClientApp process for a SuperNode started with ``--isolation process``."""
    try:
        from .deployment import executor

        executor.check_flower_version()
    except ImportError as err:  # a Flower whose version passes but whose internals moved
        print(f"the warm ClientApp executor cannot use the installed Flower: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # UnsupportedFlowerVersion, raised before `executor` can be named
        print(err, file=sys.stderr)
        return 2
    for path in (args.root_certificates, args.superexec_auth_secret_file):
        if path is not None and not os.path.isfile(path):
            print(f"{path}: no such file", file=sys.stderr)
            return 2
    endpoint = executor.Endpoint(
        args.runtime_api_address, args.insecure, args.root_certificates, args.superexec_auth_secret_file
    )
    try:
        return executor.serve(endpoint, args.poll_interval)
    except executor.RuntimeApiRefused as err:
        print(err, file=sys.stderr)
        return 2


def _supernode(args: argparse.Namespace) -> int:
    """Flower's SuperNode, asking for its next message every ``--idle-poll`` s instead of 3 s."""
    try:
        from .deployment import supernode

        rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
        supernode.supernode_main(rest, args.idle_poll, args.warm)
    except (ImportError, RuntimeError, ValueError) as err:  # UnsupportedFlowerVersion, WarmOptionsRefused
        print(err, file=sys.stderr)
        return 2
    return 0


def _clientapp(rest: list[str]) -> int:
    """``flwr-clientapp REST`` with the node's trusted-apps check: this process becomes the checked one."""
    try:
        from .deployment.supernode import check_flower_version, clientapp_command

        check_flower_version()
    except (ImportError, RuntimeError) as err:  # UnsupportedFlowerVersion is a RuntimeError
        print(err, file=sys.stderr)
        return 2
    command = [*clientapp_command(), *(rest[1:] if rest[:1] == ["--"] else rest)]
    os.execv(command[0], command)
    return 2  # not reached


def _sign_app(args: argparse.Namespace) -> int:
    """Sign an app folder for the nodes' trusted-app-keys (docs/deployment.md 3.12)."""
    from pathlib import Path

    from .deployment.pinning import SIGNATURE_FILE
    from .deployment.publish import sign_app_folder

    try:
        public, digest = sign_app_folder(Path(args.app), Path(args.key).read_bytes())
    except (OSError, TypeError, ValueError) as err:  # no file, an encrypted or non-Ed25519 key
        print(err, file=sys.stderr)
        return 2
    print(f"wrote {Path(args.app) / SIGNATURE_FILE}")
    print(f"nodes: trusted-app-keys='{public}'\nthis bundle: sha256 {digest}")
    return 0


def _secagg_keys(args: argparse.Namespace) -> int:
    """One Ed25519 signing key per node and the federation's roster (docs/secure-aggregation.md)."""
    from prism_flwr.secagg.crypto import SecAggError
    from prism_flwr.secagg.identity import write_federation

    try:
        keys, roster = write_federation(args.out, args.nodes)
    except SecAggError as err:
        print(err, file=sys.stderr)
        return 2
    template = str(keys[0].parent / "node-{partition-id}.key")
    print(f"{len(keys)} signing keys and {roster} written; give node i its own key file only.")
    print(f"node config: secagg-key='{keys[0]}' secagg-roster='{roster}' (node 0)")
    print(f"simulation (PRISM_NODE_CONFIG): secagg-key='{template}' secagg-roster='{roster}'")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="prism-flwr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("data", help="prepare or check a dataset")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--data-dir", default=RunConfig().data_dir)
    p.add_argument(
        "--download",
        choices=("auto", "true", "false"),
        default="auto",
        nargs="?",
        const="true",
        help="auto (default) or true (also plain --download): fetch a missing dataset once with "
        "torchvision (needs the internet); false: never",
    )
    p.set_defaults(fn=_data)
    p = sub.add_parser("sample", help="sample a grid PNG from an exported model")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_sample)
    p = sub.add_parser("evaluate", help="score an exported model against the real test split")
    p.add_argument("model")
    p.add_argument("--dataset", choices=DATASETS, help="default: the dataset stored in the model file")
    p.add_argument("--data-dir", default=RunConfig().data_dir)
    p.add_argument("--n", type=int, default=10000, help="samples (and real test images) to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception-weights", default="", help="torchvision Inception-V3 checkpoint: report FID")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(fn=_evaluate)
    p = sub.add_parser("feature-net", help="train (once) and cache the classifier behind the FD metric")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--data-dir", default=RunConfig().data_dir)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--download",
        choices=("auto", "true", "false"),
        default="auto",
        nargs="?",
        const="true",
        help="auto (default) or true (also plain --download): fetch a missing dataset once with "
        "torchvision (needs the internet); false: never",
    )
    p.add_argument("--force", action="store_true", help="retrain even when cached")
    p.set_defaults(fn=_feature_net)
    p = sub.add_parser("last-run", help="status of the newest Flower run; exit 1 unless it completed")
    p.add_argument("connection", nargs="?", help="SuperLink connection name (default: the default one)")
    p.set_defaults(fn=_last_run)
    p = sub.add_parser(
        "clientapp-executor", help="serve every ClientApp message of a SuperNode in one process"
    )
    p.add_argument(
        "--runtime-api-address",
        "--appio-api-address",
        required=True,
        metavar="HOST:PORT",
        help="the SuperNode's Runtime API (flower-supernode --isolation process --port)",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", metavar="CA.crt", help="CA of the SuperNode's --ssl-certfile")
    p.add_argument("--superexec-auth-secret-file", help="as the SuperNode's --superexec-auth-secret-file")
    p.add_argument(
        "--poll-interval", type=_poll_seconds, default=0.1, help="seconds between AcquireTask polls (0.01-60)"
    )
    p.set_defaults(fn=_clientapp_executor)
    p = sub.add_parser(
        "supernode", help="flower-supernode with its 3 s idle poll shortened, ClientApps checked"
    )
    p.add_argument(
        "--idle-poll",
        type=_poll_seconds,
        default=0.2,
        help="longest wait of the SuperNode loop in seconds (Flower's: 3 s when idle)",
    )
    p.add_argument(
        "--warm",
        action="store_true",
        help="no SuperExec process: this process acquires the ClientApp tasks for one warm worker "
        "(--isolation process; the small-device mode)",
    )
    p.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    p.set_defaults(fn=_supernode)
    p = sub.add_parser("secagg-keys", help="signing keys and roster of a federation for secure aggregation")
    p.add_argument("--nodes", type=int, required=True, help="nodes in the federation (node-0 .. node-N-1)")
    p.add_argument("--out", required=True, help="folder for node-<i>.key (0600) and roster.json")
    p.set_defaults(fn=_secagg_keys)
    p = sub.add_parser("clientapp", help="flwr-clientapp that runs only the node's trusted-apps")
    p.add_argument("clientapp_args", nargs=argparse.REMAINDER, help="flwr-clientapp's arguments")
    p = sub.add_parser(
        "sign-app", help="sign an app folder (app-signature.json) for the nodes' trusted-app-keys"
    )
    p.add_argument("app", nargs="?", default=".", help="the app folder (default: .)")
    p.add_argument(
        "--key", required=True, help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519)"
    )
    p.set_defaults(fn=_sign_app)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["clientapp"]:  # flwr-clientapp's options are passed on as they are
        return _clientapp(argv[1:])
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as err:
        if not _user_error(err):
            raise
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
