"""Codec and aggregation speed at paper scale, each next to a naive float32 baseline.

    python benchmarks/bench_core.py [--clients 100] [--ngf 64] [--repeats 3]

Prints one JSON line. Both sides of every ratio run in this process on the same input:
- encode/decode: our 1-bit codec (header + packbits + crc32) vs serialising the mask as float32
  (what the official single-process code would have to send);
- aggregation: decoding (with every check) and counting ones on the packed masks of K clients and
  the smoothed mean, vs a naive FedAvg mean of the same K masks held as a K x N float32 matrix;
  the MADA update that follows (two Bernoulli samples of N, the blend) is timed on its own.
Timings are the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from prism_flwr.aggregation import aggregate, count_ones, smoothed_mean
from prism_flwr.codec import decode_mask, encode_mask
from prism_flwr.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.masked import layout_fingerprint, num_masked


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
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

    def mean_from_bits():  # validate + decode every blob, count ones, smoothed mean
        counts, k = count_ones((decode_mask(b, n, layout) for b in blobs), n)
        return smoothed_mean(counts, k)

    t_ours = best_of(mean_from_bits, args.repeats)
    counts, k = count_ones((decode_mask(b, n, layout) for b in blobs), n)
    t_mada = best_of(lambda: aggregate(scores, counts, k, method="mada", rng=np.random.default_rng(1)), args.repeats)
    dense = np.stack([m.astype(np.float32) for m in masks])  # K x N float32: the naive server's input
    t_naive = best_of(lambda: dense.mean(axis=0), args.repeats)

    mb = n / 1e6
    print(json.dumps({
        "bench": "core", "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "weights": n, "clients": args.clients,
        "uplink_bytes_per_client": len(blobs[0]), "uplink_bits_per_weight": 8 * len(blobs[0]) / n,
        "float32_bytes_per_client": 4 * n,
        "encode_mweights_per_s": mb / t_enc, "encode_float32_mweights_per_s": mb / t_enc_f32,
        "encode_payload_mb_per_s": len(blobs[0]) / 1e6 / t_enc,
        "decode_mweights_per_s": mb / t_dec, "decode_float32_mweights_per_s": mb / t_dec_f32,
        "decode_payload_mb_per_s": len(blobs[0]) / 1e6 / t_dec,
        "mean_from_bits_s": t_ours, "naive_float32_mean_s": t_naive, "mean_speedup": t_naive / t_ours,
        "mada_update_s": t_mada,
        "aggregate_input_mb": sum(map(len, blobs)) / 1e6, "naive_input_mb": dense.nbytes / 1e6,
    }))


if __name__ == "__main__":
    main()
