"""Which combinations of run-config options are supported: one table, read by ``RunConfig``.

``RULES``: when every key of a rule's ``when`` holds one of the listed values, its ``key`` must
hold one of ``allowed``; otherwise ``RunConfig`` refuses the run with the rule's one-line reason.
``UNUSED``: keys a combination accepts but never reads (the dense baseline has no mask to code).
Every combination of ``MATRIX_KEYS`` the rules leave is supported: ``supported`` lists them, once
per behaviour, ``tests/test_matrix.py`` runs each through the ClientApp and the strategy, and
``tools/gen_config_docs.py`` renders both tables into docs/configuration.md. Keys and values are
spelled as in the run config (kebab-case); this module knows no other part of the package.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# The options whose every combination is either run by tests/test_matrix.py or refused.
MATRIX_KEYS = (
    "method",
    "aggregation",
    "dp",
    "objective",
    "secure-aggregation",
    "downlink",
    "robust-aggregation",
    "uplink-coding",
)


@dataclass(frozen=True)
class Rule:
    """``when`` (key -> values, all must hold) restricts ``key`` to ``allowed``, because ``why``."""

    when: Mapping[str, tuple] = field(hash=False)
    key: str
    allowed: tuple
    why: str

    def refuses(self, values: Mapping[str, object]) -> bool:
        return all(values[k] in v for k, v in self.when.items()) and values[self.key] not in self.allowed

    def message(self, values: Mapping[str, object]) -> str:
        """One line: the combination, the reason, what to use instead."""
        given = " with ".join(f"{k}={values[k]!r}" for k in (*self.when, self.key))
        use = " or ".join(repr(v) for v in self.allowed)
        return f"{given} is not supported: {self.why}; use {self.key}={use}"


@dataclass(frozen=True)
class Unused:
    """Under ``when``, the ``keys`` are accepted and have no effect, because ``why``."""

    when: Mapping[str, tuple] = field(hash=False)
    keys: tuple[str, ...]
    why: str

    def holds(self, values: Mapping[str, object]) -> bool:
        return all(values[k] in v for k, v in self.when.items())


RULES: tuple[Rule, ...] = (
    Rule(
        {"dp": ("statistics",)},
        "objective",
        ("feature-matching",),
        "the kernel MMD objective reads raw data batches at every local step, so a one-off release of "
        "the feature mean and variance cannot protect them (dp='theta' works with 'mmd')",
    ),
    Rule({"method": ("dense",)}, "dp", ("off",), "method='dense' is the non-private baseline"),
    Rule(
        {"method": ("dense",)},
        "robust-aggregation",
        ("off",),
        "robust-aggregation applies to PRISM's masks; the dense baseline always clips update norms",
    ),
    Rule(
        {"method": ("dense",)},
        "secure-aggregation",
        ("off",),
        "secure aggregation sums PRISM's binary masks, the dense baseline sends float weights",
    ),
    Rule(
        {"secure-aggregation": ("secagg+",)},
        "robust-aggregation",
        ("off",),
        "secure aggregation hides each client's mask, which robust-aggregation must see",
    ),
    Rule(
        {"partitioning": ("attribute",)},
        "dataset",
        ("celeba",),
        "partitioning='attribute' splits CelebA by its Male attribute",
    ),
)

UNUSED: tuple[Unused, ...] = (
    Unused(
        {"method": ("dense",)},
        ("aggregation", "mada-space", "downlink", "uplink-coding"),
        "the dense baseline sends float32 weights both ways and averages them (FedAvg)",
    ),
    Unused(
        {"secure-aggregation": ("secagg+",)},
        ("uplink-coding",),
        "the client's mask travels masked, at ceil(log2(K + 1)) bits per weight, never coded",
    ),
    Unused(
        {"aggregation": ("mean", "adam", "beta")},
        ("mada-space",),
        "only `mada` and `mada-change` blend old and new scores",
    ),
)


def refusal(values: Mapping[str, object]) -> str | None:
    """Every rule ``values`` (run-config key -> value) break, in one line; None if supported."""
    broken = [rule.message(values) for rule in RULES if rule.refuses(values)]
    return "; ".join(broken) or None


def canonical(values: Mapping[str, object], defaults: Mapping[str, object]) -> dict[str, object]:
    """``values`` with every key the combination does not read set to its default."""
    out = dict(values)
    for unused in UNUSED:
        if unused.holds(values):
            out.update({k: defaults[k] for k in unused.keys if k in out})
    return out


def supported(choices: Mapping[str, Sequence], defaults: Mapping[str, object]) -> list[dict[str, object]]:
    """Every combination of ``choices`` (key -> allowed values; other keys at ``defaults``) that
    no rule refuses, each behaviour once (keys it does not read at their default)."""
    keys = list(choices)
    seen, out = set(), []
    for combo in itertools.product(*(choices[k] for k in keys)):
        values = {**defaults, **dict(zip(keys, combo))}
        if refusal(values) is not None:
            continue
        key = tuple(canonical(values, defaults)[k] for k in keys)
        if key not in seen:
            seen.add(key)
            out.append(dict(zip(keys, key)))
    return out
