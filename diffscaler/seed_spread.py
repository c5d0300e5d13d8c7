"""Mean ± std over training seeds per task and method, and which differences exceed the seed spread.

The evaluate stage scores every fine-tune variant as its own row: a method at finetune.seed is labelled
`<method>`, the same method at an extra seed (finetune.extra_seeds) `<method> seed N`. Here those rows
are pooled per (task, method). A method **wins** against another on a task only when the gap between
their means exceeds the sum of their seed stds (the mean ± std bands do not overlap); otherwise the
two **tie**. A method run at one seed has no spread, so it is never called a winner or a loser.

    lines = seed_spread_section(fid_rows, methods=("affiner", "lora", "difffit", "bitfit", "full"))
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = (("fid", "FID", ".1f"), ("kid_mean", "KID", ".4f"))  # (fid.json key, column name, format)


@dataclass(frozen=True)
class SeedStats:
    n: int  # seeds pooled
    mean: float
    std: float  # sample std over seeds (ddof 1); nan for a single seed

    def cell(self, spec: str) -> str:
        spread = f" ± {format(self.std, spec)}" if self.n > 1 else ""
        return f"{format(self.mean, spec)}{spread} (n={self.n})"


def seed_method(label: str, method: str) -> bool:
    """Whether a row label is `method` itself or one of its extra seeds (`<method> seed N`)."""
    return label == method or re.fullmatch(re.escape(method) + r" seed \d+", label) is not None


def pool_seeds(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[str, str], SeedStats]:
    """{(task, method): stats of `key` over that method's seed rows} for every scored fine-tune row."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        method, task, value = r.get("method") or "", r.get("task"), r.get(key)
        if r.get("status") != "ok" or not task or not method or value is None or not seed_method(r["label"], method):
            continue
        values.setdefault((task, method), []).append(float(value))
    return {
        k: SeedStats(len(v), float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan)
        for k, v in values.items()
    }


def verdict(a: SeedStats, b: SeedStats) -> str:
    """'win' when a is lower (better) than b by more than their summed seed stds, 'loss' the other way,
    'tie' inside the spread; '?' when either has a single seed (no spread to judge by)."""
    if a.n < 2 or b.n < 2:
        return "?"
    gap = b.mean - a.mean
    if abs(gap) <= a.std + b.std:
        return "tie"
    return "win" if gap > 0 else "loss"


def seed_spread_section(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """Markdown: per task, each method's mean ± std over seeds, and the first method against each other
    method (win / tie / loss beyond the seed spread). Empty when no method has more than one seed."""
    stats = {key: pool_seeds(rows, key) for key, _, _ in METRICS}
    fid = stats["fid"]
    if not any(s.n > 1 for s in fid.values()):
        return []
    present = [m for m in methods if any(k[1] == m for k in fid)]
    tasks = sorted({k[0] for k in fid})
    out = [
        "## Over seeds: mean ± std per task and method",
        "",
        "Every method's rows at its seeds (finetune.seed and finetune.extra_seeds) pooled; std over the seeds "
        "(ddof 1). A difference is a **win** only when the gap between two means exceeds the sum of their "
        "seed stds; inside it the two **tie**. `?` = a method with one seed (no spread to judge by).",
        "",
    ]
    for key, name, spec in METRICS:
        out += [
            f"**{name}** (lower is better):",
            "",
            "| task | " + " | ".join(present) + " |",
            "|---|" + "---:|" * len(present),
        ]
        for task in tasks:
            cells = [stats[key][(task, m)].cell(spec) if (task, m) in stats[key] else "-" for m in present]
            out.append(f"| {task} | " + " | ".join(cells) + " |")
        out.append("")
    if len(present) > 1:
        ref = present[0]
        others = present[1:]
        out += [
            f"**{ref} against each method** (FID / KID; win = {ref} better beyond the seed spread):",
            "",
            "| task | " + " | ".join(f"vs {m}" for m in others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for task in tasks:
            cells = []
            for m in others:
                pair = [
                    verdict(stats[key][(task, ref)], stats[key][(task, m)])
                    if (task, ref) in stats[key] and (task, m) in stats[key]
                    else "-"
                    for key, _, _ in METRICS
                ]
                cells.append(" / ".join(pair))
            out.append(f"| {task} | " + " | ".join(cells) + " |")
        out.append("")
    return out
