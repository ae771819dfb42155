"""One local training step on the CPU: the step as it was, each lever, and the step as it is now.

    python -m benchmarks.cpu_step [--ngf 16 32 64] [--steps 8] [--repeats 3] [--compile]

One thread (``configure_threads(1)``; ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads), batch
64, pixel MMD (the default objective). A step is timed in CPU time of its thread
(``time.thread_time``: on a busy machine wall time mostly measures the wait for a core; wall
time is printed beside it), by phase: mask sampling (``W * m`` of every
layer), forward, loss, backward, optimizer (Adam on the scores). Variants, interleaved repetition
by repetition so that a busy machine slows them alike (the median of ``--repeats`` is reported):

- ``before``: float32, contiguous (NCHW), ``torch.bernoulli`` masks, the 1x1 skip conv after the
  upsampling (the step before this benchmark's levers);
- one lever at a time on top of ``before``: ``channels_last``, ``bf16`` (autocast), ``uniform``
  masks (``u < theta``), ``skip-first`` (the skip conv before the upsampling: same result, 1/4 of
  its FLOPs); ``bf16+channels_last``;
- ``prev-float32`` and ``prev-bf16``: NHWC, uniform masks, skip first (the step before the next
  three levers), and one at a time on top of ``prev-float32``: ``phase`` (conv1 of the upsampled
  input as a stride-2 transposed conv with phase kernels, ``model/upconv.py``), ``head-mm`` (the
  head as one matmul) and ``narrow-out`` (the image layer as a matmul and shifted sums, float32
  only; ``model/matmul_conv.py``);
- ``now-float32`` and ``now-bf16``: the generator's own forward and sampler as they are now, in
  each precision (``precision = "auto"`` picks bf16 on a CPU with AVX512-BF16 or AMX).

GFLOP/s is counted twice per CPU second of the whole step: on the model's nominal FLOPs (the
layers computed directly, as ``prev-float32`` does: the same for every variant, so it is a speed)
and on the FLOPs the variant does (``torch.utils.flop_counter``: convolutions and matmuls,
forward and backward; the phase form does 16/36 of conv1's). ``of f32 mm`` / ``of bf16 mm``
compare them with a float32 / bf16 2048x2048 matmul timed at every repetition between the
variants (the ceiling of such work on this core under the same load; median). ``--compile`` adds
``torch.compile`` of the ``now-bf16`` forward (cold compile time and steady step). Prints a table
and one JSON line naming the CPU and its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from prism_flwr.model.generator import GeneratorSpec, ResnetGenerator
from prism_flwr.model.masked import masked_layers, masked_weights
from prism_flwr.model.matmul_conv import head_conv, narrow_conv3x3, narrow_pays
from prism_flwr.model.objectives import mmd2_unbiased
from prism_flwr.model.precision import BF16_FLAGS, cpu_has_bf16, cpuinfo_flags
from prism_flwr.model.upconv import up2_conv3x3
from prism_flwr.threads import configure_threads

BATCH = 64
CLOCK = time.thread_time  # CPU time of this thread: what a step costs, not how long it waited for a core
PHASES = ("mask", "forward", "loss", "backward", "optimizer")
PREV = frozenset({"channels_last", "uniform", "skip-first"})  # the step before the phase form
NOW = PREV | {"phase", "head-mm", "narrow-out"}
# name -> the levers it pulls; "now-*" run the generator's own forward, the others its explicit form
VARIANTS = {
    "before": frozenset(),
    **{lever: frozenset({lever}) for lever in ("channels_last", "bf16", "uniform", "skip-first")},
    "bf16+channels_last": frozenset({"bf16", "channels_last"}),
    "prev-float32": PREV,
    **{f"prev+{lever}": PREV | {lever} for lever in ("phase", "head-mm", "narrow-out")},
    "prev-bf16": PREV | {"bf16"},
    "now-float32": NOW,
    "now-bf16": NOW | {"bf16"},
}
WIDE_VARIANTS = ("before", "prev-float32", "prev-bf16", "now-float32", "now-bf16")  # at ngf > 16


class _Bernoulli(torch.autograd.Function):
    """The sampler as it was: ``torch.bernoulli`` forward, ``theta * grad`` backward."""

    @staticmethod
    def forward(ctx, theta):  # type: ignore[override]
        ctx.save_for_backward(theta)
        return torch.bernoulli(theta)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (theta,) = ctx.saved_tensors
        return grad * theta


def bernoulli_weights(layers) -> list[torch.Tensor]:
    flat = torch.cat([m.scores.reshape(-1) for m in layers])
    mask = _Bernoulli.apply(torch.sigmoid(flat))
    parts = torch.split(mask, [m.scores.numel() for m in layers])
    return [m.weight * p.view_as(m.weight) for m, p in zip(layers, parts)]


def explicit_forward(model: ResnetGenerator, z, w, levers: frozenset):
    """The generator's forward written out, with the layout, the skip order and the three
    matmul/phase forms as switches."""
    head = model.head if "head-mm" not in levers else lambda z, w: head_conv(z, w)
    h = head(z.view(z.shape[0], -1, 1, 1), w[0])
    cl = "channels_last" in levers
    h = h.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    for i, b in enumerate(model.blocks):
        w1, w2, ws = w[1 + 3 * i : 4 + 3 * i]
        a = F.relu(b.bn1(h))
        y = up2_conv3x3(a, w1) if "phase" in levers else b.conv1(F.interpolate(a, scale_factor=2), w1)
        y = b.conv2(F.relu(b.bn2(y)), w2)
        if "skip-first" in levers:
            h = y + F.interpolate(b.skip(h, ws), scale_factor=2)
        else:
            h = y + b.skip(F.interpolate(h, scale_factor=2), ws)
    h = F.relu(model.bn(h))
    narrow = "narrow-out" in levers and narrow_pays(h, w[-1])
    return torch.tanh(narrow_conv3x3(h, w[-1]) if narrow else model.out(h, w[-1]))


class Step:
    """One variant's step on its own copy of the generator and Adam state."""

    def __init__(self, ngf: int, variant: str, real: torch.Tensor, compiled: bool = False) -> None:
        self.levers, self.own = VARIANTS[variant], variant.startswith("now-")
        self.bf16, self.uniform = "bf16" in self.levers, "uniform" in self.levers
        self.model = ResnetGenerator(GeneratorSpec(ngf=ngf))
        self.layers = masked_layers(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.1, betas=(0.5, 0.999))
        self.real = real
        self.gen = torch.Generator().manual_seed(0)
        self.forward = self._forward
        if compiled:
            self.forward = torch.compile(self._forward, dynamic=False)

    def _forward(self, z, w):
        if self.own:
            return self.model(z, w)
        return explicit_forward(self.model, z, w, self.levers)

    def __call__(self) -> dict[str, float]:
        wall, t = time.perf_counter(), [CLOCK()]
        w = masked_weights(self.layers) if self.uniform else bernoulli_weights(self.layers)
        t.append(CLOCK())
        z = torch.randn(BATCH, self.model.spec.nz, generator=self.gen)
        ctx = (
            torch.autocast("cpu", torch.bfloat16, cache_enabled=False)
            if self.bf16
            else contextlib.nullcontext()
        )
        with ctx:
            fake = self.forward(z, w)
        fake = fake.float()
        t.append(CLOCK())
        idx = torch.randint(len(self.real), (BATCH,), generator=self.gen)
        loss = mmd2_unbiased(fake.flatten(1), self.real[idx].flatten(1))
        t.append(CLOCK())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(CLOCK())
        self.opt.step()
        t.append(CLOCK())
        return {
            "wall": 1e3 * (time.perf_counter() - wall),
            **{p: 1e3 * (b - a) for p, a, b in zip(PHASES, t, t[1:])},
        }

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops()


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def bench_width(ngf: int, variants, steps: int, repeats: int, real, compile_: bool) -> dict:
    runs = {v: Step(ngf, v, real) for v in variants}
    if compile_:
        t0 = time.perf_counter()
        runs["now-bf16-compiled"] = Step(ngf, "now-bf16", real, compiled=True)
        runs["now-bf16-compiled"]()  # the cold compile
        compile_s = time.perf_counter() - t0
    flops = {v: s.flops() for v, s in runs.items()}
    samples: dict[str, list[dict]] = {v: [] for v in runs}
    ceilings: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(repeats):
        for dtype in ceilings:  # the ceilings under the same load as the steps around them
            ceilings[dtype].append(matmul_gflops(getattr(torch, "bfloat16" if dtype == "bf16" else dtype)))
        for v, step in runs.items():
            step()  # one warm-up step per repetition (allocator, oneDNN primitive cache)
            per = [step() for _ in range(steps)]
            samples[v].append({p: statistics.mean(s[p] for s in per) for p in ("wall", *PHASES)})
    nominal = flops["prev-float32"]  # the model's layers computed directly (no phase form)
    out = {}
    for v, reps in samples.items():
        phases = {p: statistics.median(r[p] for r in reps) for p in PHASES}
        total = statistics.median(sum(r[p] for p in PHASES) for r in reps)
        out[v] = {
            "ms": total,
            "wall_ms": statistics.median(r["wall"] for r in reps),
            "phases_ms": phases,
            "gflop": flops[v] / 1e9,  # done by this variant
            "gflops": flops[v] / 1e9 / (total / 1e3),
            "gflop_nominal": nominal / 1e9,
            "gflops_nominal": nominal / 1e9 / (total / 1e3),
        }
    if compile_:
        out["now-bf16-compiled"]["cold_compile_s"] = compile_s
    return out, {k: statistics.median(v) for k, v in ceilings.items()}


def print_table(res: dict, ceiling: dict) -> None:
    """Markdown table: ms by phase, speed-up, GFLOP/s on the nominal and on the done FLOPs."""
    base, f32, bf16 = res["before"]["ms"], ceiling["float32"], ceiling["bf16"]
    print(f"matmul 2048^2 between them: float32 {f32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    print(f"nominal GFLOP per step (the layers computed directly): {res['before']['gflop_nominal']:.2f}")
    print(
        f"| variant | CPU ms/step | x before | {' | '.join(PHASES)} | GFLOP done | nominal GFLOP/s | "
        "of f32 mm | of bf16 mm | done GFLOP/s | of f32 mm | wall ms |"
    )
    print("|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|---|---|---|")
    for v, r in res.items():
        ph = " | ".join(f"{r['phases_ms'][p]:.1f}" for p in PHASES)
        nom, done = r["gflops_nominal"], r["gflops"]
        print(
            f"| {v} | {r['ms']:.1f} | {base / r['ms']:.2f} | {ph} | {r['gflop']:.2f} | {nom:.1f} | "
            f"{nom / f32:.2f} | {nom / bf16:.2f} | {done:.1f} | {done / f32:.2f} | {r['wall_ms']:.0f} |"
        )
        if "cold_compile_s" in r:
            print(f"(cold compile of {v}: {r['cold_compile_s']:.0f} s)")
    for prec in ("float32", "bf16"):
        if f"now-{prec}" in res:
            print(f"now-{prec} is {res[f'prev-{prec}']['ms'] / res[f'now-{prec}']['ms']:.2f}x prev-{prec}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ngf", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--steps", type=int, default=8, help="steps per repetition at ngf 16 (fewer when wider)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (1 at ngf 64)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the now-bf16 step (ngf 16)")
    args = ap.parse_args()
    configure_threads(1)
    torch.manual_seed(0)
    real = torch.rand(2000, 1, 32, 32) * 2 - 1
    flags = sorted(cpuinfo_flags() & {*BF16_FLAGS, "amx_tile", "avx512f", "avx2"})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit.strip(),
        "load_average": os.getloadavg()[0],
        "cpu": cpu_name(),
        "flags": flags,
        "bf16_native": cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "widths": {},
    }
    print(f"# {result['cpu']} ({', '.join(flags)}), 1 thread, batch {BATCH}, pixel MMD")
    print(
        f"# {result['date']}, commit {result['commit']}, load average {result['load_average']:.1f} at the start"
    )
    for ngf in args.ngf:
        variants = VARIANTS if ngf == 16 else WIDE_VARIANTS
        steps = max(1, args.steps * 16 // ngf // (2 if ngf >= 64 else 1))
        repeats = 1 if ngf >= 64 else args.repeats
        res, ceiling = bench_width(ngf, variants, steps, repeats, real, args.compile and ngf == 16)
        result["widths"][ngf] = {"variants": res, "matmul_gflops": ceiling}
        print(f"\nngf {ngf}: {steps} steps x {repeats} repetitions")
        print_table(res, ceiling)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
