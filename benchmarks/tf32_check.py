"""TF32 vs full float32 convolutions, side by side with the same seeds (CUDA only).

    python -m benchmarks.tf32_check --ngf 64 --steps 300

PyTorch runs cuDNN convolutions in TF32 by default on Ampere and newer GPUs (matrix products
stay float32 unless asked). Here one client trains ``--steps`` local steps on a real
Fashion-MNIST shard twice per seed, TF32 on and off, and the result is scored with the project's
metric (FD-FMNIST-CNN on ``--eval-samples`` samples) and timed. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prism_flwr.config import RunConfig  # noqa: E402
from prism_flwr.data.client_cache import client_data
from prism_flwr.evaluation.evaluator import Evaluator  # noqa: E402
from prism_flwr.federated.methods import PRISM  # noqa: E402
from prism_flwr.model.build import generator_spec
from prism_flwr.model.features import PixelFeatures  # noqa: E402
from prism_flwr.model.generator import ResnetGenerator  # noqa: E402
from prism_flwr.model.training import ClientState, train_local  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[30, 31])
    p.add_argument("--eval-samples", type=int, default=2000)
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        cfg = RunConfig.parse({"ngf": args.ngf, "local-steps": args.steps, "seed": seed, "device": "cuda"})
        ev = Evaluator(cfg.dataset, cfg.resolved_data_dir(), args.eval_samples, seed, "cuda")
        data, _ = client_data(cfg, 0, 10, torch.device("cuda"))
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.manual_seed(seed)
            model = ResnetGenerator(generator_spec(cfg)).cuda()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = train_local(
                model,
                PixelFeatures(),
                data,
                PRISM.train_settings(cfg),
                ClientState(),
                torch.Generator(device="cuda").manual_seed(seed),
            )
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            metrics, _ = ev.evaluate(model, PRISM.eval_mask_mode)
            rows.append(
                {
                    "seed": seed,
                    "tf32": tf32,
                    "ms_per_step": 1e3 * seconds / args.steps,
                    "loss": res["loss"],
                    ev.metric_name: metrics[ev.metric_name],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    torch.backends.cudnn.allow_tf32 = True
    out = {
        "bench": "tf32_check",
        "device": torch.cuda.get_device_name(0),
        "ngf": args.ngf,
        "steps": args.steps,
        "rows": rows,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
