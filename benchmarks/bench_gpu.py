"""Local-step speed by generator width and objective, and a round in one process.

    python -m benchmarks.bench_gpu                 # widths 16, 32, 64; on CUDA when visible
    python -m benchmarks.bench_gpu --size tiny     # a seconds-long CPU smoke run (the test suite)

For each width and objective it times ``--steps`` local steps (batch 64) three ways, side by side
in one process on the same device:

- ``landed``: the plain reference step: one Bernoulli draw per layer, ``loss.item()`` and a
  finiteness check (host synchronisations) every step;
- ``eager``: ``training.train_local`` without a CUDA graph (fused mask sampling, no host sync
  inside the loop);
- ``graph``: ``training.train_local`` as clients run it on a GPU (the step captured in a CUDA
  graph after ``WARMUP_STEPS`` eager steps; CUDA only).

A round of local training has fixed costs (optimiser set-up and state copies, the eager warm-up
steps and the graph capture) and a cost per step. Each variant is timed at ``--steps`` and at
three times as many steps; the difference gives the **marginal** cost of one step and the rest
the fixed cost per round. ``ms/step`` in the table is the marginal cost; the JSON line also holds
the fixed cost and the plain average over a ``--steps`` round.

Objectives: ``mmd`` (kernel MMD^2 on pixels) and ``fm-vgg19`` (feature matching on the
activations of a VGG19 of random weights: the cost of the official code's features without the
ImageNet file). Each timing is the median of ``--repeats`` rounds (first round discarded as
warm-up). Then one in-process round (``inprocess.run``, ``--clients`` shard clients x
``--round-steps`` steps at the largest width) is timed: round 1 pays data loading and first
captures, so round 2 is the figure. Prints a table and one JSON line; peak GPU memory per row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace

import torch

from prism_flwr.config import RunConfig  # noqa: E402
from prism_flwr.model.features import PixelFeatures, VGG19Features  # noqa: E402
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator  # noqa: E402
from prism_flwr.model.masked import masked_layers, set_mask_mode  # noqa: E402
from prism_flwr.model.objectives import FeatureMatching, mmd2_unbiased  # noqa: E402
from prism_flwr.model.training import ClientState, TrainSettings, real_feature_moments, train_local  # noqa: E402

SIZES = {
    "gpu": {
        "widths": [16, 32, 64],
        "objectives": ["mmd", "fm-vgg19"],
        "steps": 100,
        "repeats": 4,
        "clients": 10,
        "round_steps": 100,
    },
    "tiny": {"widths": [4], "objectives": ["mmd"], "steps": 3, "repeats": 2, "clients": 2, "round_steps": 2},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def landed_steps(model, features, data, settings: TrainSettings, steps: int) -> None:
    """The step loop as landed: per-layer Bernoulli draws, a host sync on every step."""
    set_mask_mode(model, "sample", settings.estimator)
    model.train()
    layers = masked_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr, betas=settings.betas)
    fm = None
    if settings.objective == "feature-matching":
        mu, var = real_feature_moments(features, data)
        fm = FeatureMatching(mu, var).to(data.device)
    for _ in range(steps):
        z = torch.randn(settings.batch_size, model.spec.nz, device=data.device)
        fake = features(model(z, [layer.masked_weight() for layer in layers]))
        if fm is not None:
            loss = fm(fake)
        else:
            idx = torch.randint(len(data), (settings.batch_size,), device=data.device)
            with torch.no_grad():
                real = features(data[idx])
            loss = mmd2_unbiased(fake, real)
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()


def time_variant(
    variant: str,
    width: int,
    objective: str,
    device: torch.device,
    steps: int,
    repeats: int,
    data: torch.Tensor,
) -> dict:
    model = ResnetGenerator(GeneratorSpec(ngf=width, nc=1, seed=30)).to(device)
    features = (PixelFeatures() if objective == "mmd" else VGG19Features(None)).to(device)
    settings = TrainSettings(steps=steps, objective="mmd" if objective == "mmd" else "feature-matching")
    state = ClientState()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def round_seconds(n: int) -> float:
        times = []
        for r in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            if variant == "landed":
                landed_steps(model, features, data, settings, n)
            else:
                train_local(
                    model,
                    features,
                    data,
                    replace(settings, steps=n),
                    state,
                    torch.Generator(device=device).manual_seed(r),
                    cuda_graph=variant == "graph",
                )
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:] if len(times) > 1 else times)

    short, long = round_seconds(steps), round_seconds(3 * steps)
    marginal = max(0.0, (long - short) / (2 * steps))
    return {
        "variant": variant,
        "width": width,
        "objective": objective,
        "steps": steps,
        "ms_per_step": 1e3 * marginal,
        "fixed_ms_per_round": 1e3 * max(0.0, short - marginal * steps),
        "ms_per_step_in_round": 1e3 * short / steps,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def time_round(width: int, clients: int, round_steps: int, device: torch.device) -> dict:
    from prism_flwr.federated import inprocess

    cfg = RunConfig.parse(
        {
            "ngf": width,
            "local-steps": round_steps,
            "num-server-rounds": 2,
            "device": device.type,
            "partitioning": "shards",
        }
    )
    hist = inprocess.run(cfg, clients)
    r = hist[2]
    return {
        "width": width,
        "clients": clients,
        "local_steps": round_steps,
        "round_seconds": r["round_seconds"],
        "client_seconds": r["client_seconds"],
        "server_seconds": r["server_seconds"],
        "first_round_seconds": hist[1]["round_seconds"],
        "peak_gpu_mb": (hist[-1].get("peak_gpu_bytes") or 0) / 2**20,
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="gpu")
    p.add_argument("--widths", type=int, nargs="+")
    p.add_argument("--objectives", nargs="+", choices=["mmd", "fm-vgg19"])
    p.add_argument("--device", default="auto")
    p.add_argument("--no-round", action="store_true", help="skip the in-process round")
    args = p.parse_args(argv)
    size = dict(SIZES[args.size])
    widths = args.widths or size["widths"]
    objectives = args.objectives or size["objectives"]
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    data = torch.rand(6000 if args.size == "gpu" else 128, 1, 32, 32, device=device) * 2 - 1
    variants = ["landed", "eager"] + (["graph"] if device.type == "cuda" else [])
    rows = []
    print(f"marginal ms per local step (fixed ms per round of {size['steps']} steps)", flush=True)
    print(
        f"{'width':>5} {'objective':>9} "
        + " ".join(f"{v:>16}" for v in variants)
        + f" {'speed-up':>9} {'peak MB':>8}",
        flush=True,
    )
    for width in widths:
        for objective in objectives:
            res = {
                v: time_variant(v, width, objective, device, size["steps"], size["repeats"], data)
                for v in variants
            }
            best = res[variants[-1]]
            row = {
                "width": width,
                "objective": objective,
                **{f"{v}_ms_per_step": r["ms_per_step"] for v, r in res.items()},
                **{f"{v}_fixed_ms_per_round": r["fixed_ms_per_round"] for v, r in res.items()},
                **{
                    f"{v}_ms_per_step_in_{size['steps']}_step_round": r["ms_per_step_in_round"]
                    for v, r in res.items()
                },
                "speedup_vs_landed": res["landed"]["ms_per_step"] / max(best["ms_per_step"], 1e-9),
                "peak_gpu_mb": best["peak_gpu_mb"],
            }
            rows.append(row)
            print(
                f"{width:>5} {objective:>9} "
                + " ".join(
                    f"{res[v]['ms_per_step']:>7.3f} ({res[v]['fixed_ms_per_round']:>5.0f})" for v in variants
                )
                + f" {row['speedup_vs_landed']:>8.2f}x {row['peak_gpu_mb'] or 0:>8.0f}",
                flush=True,
            )
    out = {
        "bench": "gpu",
        "machine": machine(device),
        "torch": torch.__version__,
        "batch": 64,
        "steps_per_timing": size["steps"],
        "rows": rows,
    }
    if not args.no_round:
        out["round"] = time_round(max(widths), size["clients"], size["round_steps"], device)
        r = out["round"]
        print(
            f"in-process round: {r['clients']} clients x {r['local_steps']} steps at ngf {r['width']}: "
            f"{r['round_seconds']:.2f} s (clients {r['client_seconds']:.2f} s, server {r['server_seconds']:.3f} s; "
            f"first round {r['first_round_seconds']:.2f} s)",
            flush=True,
        )
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
