"""Codec, downlink and aggregation speed at paper scale, raw and entropy-coded.

    python -m benchmarks.bench_core [--clients 100] [--ngf 64] [--repeats 3] [--drift 0.0]

Prints a table and one JSON line. Everything runs in this process on the same inputs:

- raw path (as before): the 1-bit codec (header + packbits + crc32) vs serialising the mask as
  float32; decoding (with every check) and counting ones for K clients plus the smoothed mean
  vs a naive float32 mean of the same K masks; the MADA update after it on its own;
- coded path, at the theta entropies of the default run (mean binary entropy of theta 0.85,
  0.59, 0.42, 0.33 bits at rounds 1 / 5 / 10 / 15): global scores ``N(0, sigma^2)`` with sigma
  solved so that the grid's mean entropy is that value, put on the 8-bit grid; each client's
  mask is drawn from ``sigmoid(global + N(0, drift^2))`` (``--drift 0``: the client did not
  move; the cross-entropy cost of moving is measured on real training by
  ``bytes_experiment.py``). Per level: coded bits/weight (mean over 10 clients' masks) vs the
  ideal cross-entropy (mean over the first 2 of them), the
  per-round coding model (``mask_model``, once per round on each side), encode and decode time,
  the server's decoding of 10 clients (into weight order, and into the grouped layout: the
  fast path), and the 8-bit downlink (``pack_scores``: size, pack and
  unpack time) and the delta to the next state (MADA over these 10 masks, snapped).
- decode + count + smoothed mean for K coded clients at the round-10 entropy, plain and
  grouped (count in the grouped layout, map the counts back once), next to raw.
Timings are the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from prism_flwr.federated.aggregation import aggregate, count_ones, smoothed_mean
from prism_flwr.federated.codec import (
    HEADER_BYTES,
    decode_mask,
    encode_mask,
    mask_method,
    mask_model,
    packed_length,
)
from prism_flwr.federated.downlink import (
    dequantise,
    pack_delta,
    pack_scores,
    quantise,
    snap_to_grid,
    unpack_scores,
)
from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import layout_fingerprint, num_masked

ENTROPY_LEVELS = {1: 0.85, 5: 0.59, 10: 0.42, 15: 0.33}  # round -> mean theta entropy of the default run


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def scores_with_entropy(target: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Grid scores ``snap(sigma * z)`` whose mean theta entropy is ``target`` (bisection on sigma)."""
    z = rng.standard_normal(n).astype(np.float32)
    lo, hi = 0.0, 40.0
    for _ in range(40):
        sigma = (lo + hi) / 2
        h = binary_entropy(1 / (1 + np.exp(-dequantise(quantise(sigma * z)).astype(np.float64)))).mean()
        lo, hi = (sigma, hi) if h > target else (lo, sigma)
    return dequantise(quantise(np.float32(sigma) * z))


def sigmoid64(s: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-s.astype(np.float64)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--drift", type=float, default=0.0, help="sd of the client's score change (logit units)")
    args = ap.parse_args()

    model = ResnetGenerator(GeneratorSpec(ngf=args.ngf, nc=1))
    n, layout = num_masked(model), layout_fingerprint(model)
    rng = np.random.default_rng(0)
    theta = rng.random(n, dtype=np.float32)
    masks = [rng.random(n, dtype=np.float32) < theta for _ in range(args.clients)]
    blobs = [encode_mask(m, layout) for m in masks]
    scores = rng.standard_normal(n).astype(np.float32)

    t_enc = best_of(lambda: encode_mask(masks[0], layout), args.repeats)
    t_enc_f32 = best_of(lambda: masks[0].astype(np.float32).tobytes(), args.repeats)
    t_dec = best_of(lambda: decode_mask(blobs[0], n, layout), args.repeats)
    f32_blob = masks[0].astype(np.float32).tobytes()
    t_dec_f32 = best_of(lambda: np.frombuffer(f32_blob, np.float32).copy(), args.repeats)

    def mean_from_bits(blobs, model=None):  # validate + decode every blob, count ones, smoothed mean
        counts, k = count_ones((decode_mask(b, n, layout, model) for b in blobs), n)
        return smoothed_mean(counts, k)

    def mean_from_grouped(blobs, model):  # the server's fast path: count in the grouped layout
        counts, k = count_ones(
            (decode_mask(b, n, layout, model, grouped=True) for b in blobs), model.grouped_bits
        )
        return smoothed_mean(model.ungroup_counts(counts), k)

    t_ours = best_of(lambda: mean_from_bits(blobs), args.repeats)
    counts, k = count_ones((decode_mask(b, n, layout) for b in blobs), n)
    t_mada = best_of(
        lambda: aggregate(scores, counts, k, method="mada", rng=np.random.default_rng(1)), args.repeats
    )
    dense = np.stack([m.astype(np.float32) for m in masks])  # K x N float32: the naive server's input
    t_naive = best_of(lambda: dense.mean(axis=0), args.repeats)
    del dense, masks, blobs

    levels = {}
    for rnd, target in ENTROPY_LEVELS.items():
        glob = scores_with_entropy(target, n, rng)
        cm = mask_model(glob)
        t_model = best_of(lambda: mask_model(glob), args.repeats)
        client = (
            glob + np.float32(args.drift) * rng.standard_normal(n).astype(np.float32) if args.drift else glob
        )
        q = sigmoid64(client)
        ms = [rng.random(n) < q for _ in range(10)]
        cb = [encode_mask(m, layout, cm) for m in ms]
        ideal = float(
            np.mean(
                [
                    -np.where(m, np.log2(cm.probabilities()), np.log2(1 - cm.probabilities())).mean()
                    for m in ms[:2]
                ]
            )
        )
        t_cenc = best_of(lambda: encode_mask(ms[0], layout, cm), args.repeats)
        t_cdec = best_of(lambda: decode_mask(cb[0], n, layout, cm), args.repeats)
        t_dec10 = best_of(lambda: [decode_mask(b, n, layout, cm) for b in cb], args.repeats)
        t_dec10g = best_of(lambda: [decode_mask(b, n, layout, cm, grouped=True) for b in cb], args.repeats)
        codes = quantise(glob)
        down = pack_scores(codes)
        t_pack = best_of(lambda: pack_scores(codes), args.repeats)
        t_unpack = best_of(lambda: unpack_scores(down, n), args.repeats)
        # the next state: MADA over these 10 clients' masks, snapped; sent as a delta from this one
        counts, k = count_ones((decode_mask(b, n, layout, cm) for b in cb), n)
        nxt = quantise(
            snap_to_grid(
                aggregate(glob, counts, k, method="mada", rng=np.random.default_rng(rnd)).scores,
                np.random.default_rng([rnd, 8]),
            )
        )
        delta = pack_delta(nxt, codes)
        t_dpack = best_of(lambda: pack_delta(nxt, codes), args.repeats)
        t_dunpack = best_of(lambda: unpack_scores(delta, n, base=codes), args.repeats)
        levels[rnd] = {
            "theta_entropy_bits": float(binary_entropy(sigmoid64(glob)).mean()),
            "client_theta_entropy_bits": float(binary_entropy(q).mean()),
            "uplink_bits_per_weight": float(np.mean([8 * len(b) / n for b in cb])),
            "uplink_ideal_bits_per_weight": ideal,
            "uplink_methods": sorted({mask_method(b) for b in cb}),
            "model_s": t_model,
            "encode_s": t_cenc,
            "decode_s": t_cdec,
            "decode_10_clients_s": t_dec10,
            "decode_10_clients_grouped_s": t_dec10g,
            "downlink_bits_per_weight": 8 * len(down) / n,
            "downlink_pack_s": t_pack,
            "downlink_unpack_s": t_unpack,
            "downlink_delta_bits_per_weight": 8 * len(delta) / n,
            "delta_pack_s": t_dpack,
            "delta_unpack_s": t_dunpack,
        }
        if rnd == 10:
            cblobs = [
                cb[i % len(cb)] for i in range(args.clients)
            ]  # decoding work does not depend on repeats
            t_coded_mean = best_of(lambda: mean_from_bits(cblobs, cm), args.repeats)
            t_coded_mean_g = best_of(lambda: mean_from_grouped(cblobs, cm), args.repeats)
            np.testing.assert_array_equal(mean_from_bits(cblobs[:3], cm), mean_from_grouped(cblobs[:3], cm))
            coded_input_mb = sum(map(len, cblobs)) / 1e6
        del ms, cb

    mb = n / 1e6
    out = {
        "bench": "core",
        "machine": f"2-core CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "load_average_1min_at_end": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "weights": n,
        "clients": args.clients,
        "drift": args.drift,
        "uplink_raw_bytes_per_client": HEADER_BYTES + packed_length(n),
        "float32_bytes_per_client": 4 * n,
        "encode_mweights_per_s": mb / t_enc,
        "encode_float32_mweights_per_s": mb / t_enc_f32,
        "decode_mweights_per_s": mb / t_dec,
        "decode_float32_mweights_per_s": mb / t_dec_f32,
        "mean_from_bits_s": t_ours,
        "naive_float32_mean_s": t_naive,
        "mean_speedup": t_naive / t_ours,
        "mada_update_s": t_mada,
        "coded_mean_from_bits_s_round10": t_coded_mean,
        "coded_mean_from_grouped_s_round10": t_coded_mean_g,
        "coded_aggregate_input_mb_round10": coded_input_mb,
        "levels": levels,
    }
    print(
        f"# bench_core on {out['machine']}, {n:,} weights, best of {args.repeats}, client drift sd {args.drift}, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"raw: encode {mb / t_enc:,.0f} M weights/s, decode {mb / t_dec:,.0f} M weights/s; "
        f"decode+count+mean of {args.clients} clients {t_ours:.3f} s raw vs {t_coded_mean:.3f} s coded "
        f"({t_coded_mean_g:.3f} s grouped fast path; round-10 entropy) vs {t_naive:.3f} s naive float32; "
        f"MADA update {t_mada:.3f} s"
    )
    print(
        "| round | H(theta) bits | up bits/w | ideal | encode s | decode s | 10 clients s | 10 grouped s | model s "
        "| down bits/w | pack s | unpack s | delta bits/w | delta pack s | delta unpack s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rnd, lv in levels.items():
        print(
            f"| {rnd} | {lv['theta_entropy_bits']:.3f} | {lv['uplink_bits_per_weight']:.4f} | "
            f"{lv['uplink_ideal_bits_per_weight']:.4f} | {lv['encode_s']:.3f} | {lv['decode_s']:.3f} | "
            f"{lv['decode_10_clients_s']:.3f} | {lv['decode_10_clients_grouped_s']:.3f} | {lv['model_s']:.3f} | "
            f"{lv['downlink_bits_per_weight']:.3f} | "
            f"{lv['downlink_pack_s']:.3f} | {lv['downlink_unpack_s']:.3f} | {lv['downlink_delta_bits_per_weight']:.3f} | "
            f"{lv['delta_pack_s']:.3f} | {lv['delta_unpack_s']:.3f} |"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
