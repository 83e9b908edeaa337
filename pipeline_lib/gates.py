"""Quality gates: limits on what a quantized variant may lose against the float reference.

A gate is ``{variant: {metric: limit}}`` (``BuildSpec.evaluation.gates``), e.g.
``{"q4_0": {"max_mean_kl": 0.1}, "q8_0": {"max_mean_kl": 0.005}}``. The metrics are a table
(``METRICS``: name -> the report-table column it reads and the comparison). The report stage marks
every gate pass or fail (``check``); the gates stage fails the build when an enforced one failed.

Defaults (``DEFAULT_GATES``) come from llama.cpp's published KL divergence of each quantization type
against FP16 for LLaMA-class 7B/8B models (``tools/perplexity/README.md`` of llama.cpp, section
"LLaMA 3 8b Scoreboard", no importance matrix, Wikitext-2, n_ctx 512, revision f364eb6f; measured in
llama.cpp PR #6936). LLaMA 3 8B is the harder model to quantize of the two that page tabulates: where
it also lists LLaMA 2 7B (q2_K, q4_K_M, q6_K, q8_0) the LLaMA-2-7B mean KL is 2.5-4x lower. The
default limit is ``DEFAULT_FACTOR`` (2) x the LLaMA-3-8B value: a variant past it loses far more than
any LLaMA-class model of that type does in llama.cpp's measurements, while the noise of a short
evaluation (one 512-token chunk by default) and a Chinese evaluation text stay inside. They apply
to the catalog's models (7B, 13B and 33B alike: larger models lose less, so the 7B limits are loose
for them); synthetic models (``tiny-demo``, ``custom`` builds) have no default gates: a tiny random
model's quantization error says nothing about a real one's.

Whatever the gates say, a variant whose top-1 agreement with the reference is under
``BROKEN_TOP1_FRACTION`` (50%) of the reference's own is flagged as *broken* (the reference agrees with
itself 100% of the time, so this reads "top-1 agreement < 50%"; q2_K, the smallest type zhllama
offers, keeps 71% on LLaMA 3 8B and 86% on LLaMA 2 7B in the same llama.cpp table). The flag fails
the build for catalog models and for any build that sets gates; for synthetic models without gates
it is shown, not enforced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# metric -> (column of evaluate.Report.table(), "max" (measured <= limit) | "min" (measured >= limit), wording)
METRICS: dict[str, tuple[str, str, str]] = {
    "max_mean_kl": ("mean_kld", "max", "mean KL divergence"),
    "min_top1": ("top1_agreement", "min", "top-1 agreement"),
    "max_ppl_ratio": ("ppl_ratio", "max", "PPL(Q)/PPL(ref)"),
}

# llama.cpp tools/perplexity/README.md, "LLaMA 3 8b Scoreboard" (imatrix: None), column KLD.
LLAMA_CPP_MEAN_KLD: dict[str, float] = {
    "q8_0": 0.001355, "q6_K": 0.005452, "q5_K_M": 0.010762, "q5_K_S": 0.016595, "q5_1": 0.018045,
    "q5_0": 0.022239, "q4_K_M": 0.031273, "q4_K_S": 0.043136, "q4_1": 0.071683, "q4_0": 0.071940,
    "q3_K_L": 0.087176, "q3_K_M": 0.101913, "q3_K_S": 0.228217, "q2_K": 0.445132,
}
# The same page, "LLaMA 2 vs. LLaMA 3 Quantization comparison", LLaMA 2 7B mean KLD (for the docs).
LLAMA_CPP_MEAN_KLD_L2_7B: dict[str, float] = {"q2_K": 0.108903, "q4_K_M": 0.012686, "q6_K": 0.002098,
                                              "q8_0": 0.000369}
DEFAULT_FACTOR = 2.0
DEFAULT_GATES: dict[str, dict[str, float]] = {
    q: {"max_mean_kl": round(DEFAULT_FACTOR * kld, 6)} for q, kld in LLAMA_CPP_MEAN_KLD.items()}
DEFAULT_SOURCE = "llama.cpp's published KL range (2 x LLaMA-3-8B mean KLD)"

BROKEN_TOP1_FRACTION = 0.5
BROKEN = "broken_top1"  # the metric name of the broken-quantization flag


@dataclass(frozen=True)
class GateResult:
    """One gate (or the broken flag) of one variant, as measured."""

    variant: str
    metric: str  # a key of METRICS, or BROKEN
    limit: float
    measured: float | None  # None: the report has no such measurement
    passed: bool
    enforced: bool  # a failure fails the build (False: shown only)
    source: str = ""  # where the limit comes from ("evaluation.gates", the llama.cpp default, ...)

    @property
    def status(self) -> str:
        if self.passed:
            return "pass"
        return "FAIL" if self.enforced else "flagged (not enforced)"

    def describe(self) -> str:
        """``q4_0: mean KL divergence 0.1234 > limit 0.1 (max_mean_kl)``."""
        if self.metric == BROKEN:
            shown = "not measured" if self.measured is None else f"{100 * self.measured:.2f}%"
            return (f"{self.variant}: top-1 agreement {shown} < {100 * self.limit:.0f}% of the reference's "
                    "(a broken quantization)")
        _, kind, words = METRICS[self.metric]
        if self.measured is None:
            return f"{self.variant}: {words} not measured (gate {self.metric} {self.limit:g})"
        op = (">" if kind == "max" else "<") if not self.passed else ("<=" if kind == "max" else ">=")
        return f"{self.variant}: {words} {_fmt(self.measured)} {op} limit {self.limit:g} ({self.metric})"


def _fmt(x: float) -> str:
    return f"{x:.6f}" if abs(x) < 1 else f"{x:.4f}"


def validate(gates: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``gates`` with known metrics and finite, non-negative limits (a ValueError naming the bad one)."""
    out: dict[str, dict[str, float]] = {}
    for variant, limits in gates.items():
        if not isinstance(limits, Mapping):
            raise ValueError(f"gates of {variant!r} must be {{metric: limit}}, e.g. {{\"max_mean_kl\": 0.1}}")
        for metric, limit in limits.items():
            if metric not in METRICS:
                raise ValueError(f"unknown gate {metric!r} for {variant!r}; choose from {', '.join(METRICS)}")
            if isinstance(limit, bool) or not isinstance(limit, int | float) or not math.isfinite(limit) or limit < 0:
                raise ValueError(f"gate {variant}.{metric} must be a finite number >= 0, got {limit!r}")
        out[variant] = {m: float(v) for m, v in limits.items()}
    return out


def resolve(gates: Mapping[str, Mapping[str, float]] | None, *, variants: Sequence[str],
            defaults: bool) -> dict[str, dict[str, Any]]:
    """The gates in force for ``variants``: the defaults (when ``defaults``) with the spec's entries
    replacing them variant by variant (``{"q4_0": {}}`` turns q4_0's off). JSON-able:
    ``{variant: {"limits": {metric: limit}, "source": ...}}``, in variant order."""
    given = dict(gates or {})
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v in given:
            if given[v]:
                out[v] = {"limits": dict(given[v]), "source": "evaluation.gates"}
        elif defaults and v in DEFAULT_GATES:
            out[v] = {"limits": dict(DEFAULT_GATES[v]), "source": DEFAULT_SOURCE}
    return out


def check(table: Sequence[Mapping[str, Any]], gates: Mapping[str, Mapping[str, Any]], *,
          enforce_broken: bool) -> tuple[GateResult, ...]:
    """Every gate of ``gates`` (``resolve``'s form) and the broken flag of every non-reference variant,
    against ``table`` (``evaluate.Report.table()`` rows)."""
    rows = {r["variant"]: r for r in table}
    ref = next((r for r in table if r.get("reference")), None)
    ref_top1 = 1.0 if ref is None else float(ref.get("top1_agreement") or 1.0)
    results: list[GateResult] = []
    for variant, gate in gates.items():
        row = rows.get(variant, {})
        for metric, limit in gate["limits"].items():
            column, kind, _ = METRICS[metric]
            measured = row.get(column)
            passed = measured is not None and (measured <= limit if kind == "max" else measured >= limit)
            results.append(GateResult(variant, metric, float(limit), measured, passed, True, gate["source"]))
    for row in table:
        if row.get("reference"):
            continue
        top1 = row.get("top1_agreement")
        if top1 is None:
            continue  # no KL measurement (no reference): nothing to flag
        limit = BROKEN_TOP1_FRACTION * ref_top1
        results.append(GateResult(row["variant"], BROKEN, limit, top1, top1 >= limit, enforce_broken,
                                  "broken-quantization check (always checked)"))
    return tuple(results)


def failures(results: Sequence[GateResult]) -> list[GateResult]:
    """The results that fail the build."""
    return [r for r in results if r.enforced and not r.passed]
