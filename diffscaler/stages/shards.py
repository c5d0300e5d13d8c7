"""The shards stage: every dataset of data.* as WebDataset shards + index.json (diffscaler.data.build_all).

Valid when each dataset's index records the configured build parameters and `shards check` passes;
a run rebuilds only the datasets that are not (all of them with force).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffscaler.data import build_all, check_dataset, dataset_dir, dataset_jobs, load_index
from diffscaler.data.build import check_sources, dataset_parameters
from diffscaler.data.sources import dataset_name
from diffscaler.data.writer import build_changes
from diffscaler.stages.base import InputError, Run, Stage, StageCheck


class ShardsStage(Stage):
    name = "shards"

    def __init__(self, only: Sequence[str] | None = None):
        self.only = list(only) if only else None  # dataset names (default: every dataset of the config)

    def names(self, run: Run) -> list[str]:
        if self.only:
            return self.only
        names = list(dataset_jobs(run.cfg.data))
        if run.given_backbone:  # imported, never pretrained here: its pretraining set is neither read nor encoded
            pretrain = dataset_name(run.cfg.data.pretrain_source)
            if pretrain not in {t.name for t in run.cfg.data.targets}:
                names.remove(pretrain)
        return names

    def preflight(self, run: Run) -> None:
        try:  # clashing names, unknown, missing or empty sources: input errors, not a Ray task's failure
            check_sources(run.cfg.data, self.names(run), force=self.name in run.force)
        except (ValueError, FileNotFoundError) as err:
            raise InputError(str(err)) from None

    def state(self, run: Run) -> dict[str, str]:
        """{dataset: "" if built as configured and `shards check` passes, else what is wrong}."""
        state = {}
        for name in self.names(run):
            folder = dataset_dir(run.cfg.data, name)
            changes = build_changes(folder, dataset_parameters(run.cfg.data, name))
            if changes:
                state[name] = "rebuild: " + "; ".join(changes)
                continue
            report = check_dataset(folder)
            state[name] = "" if report.ok else f"shards check failed: {report.problems[0]}"
        return state

    def check(self, run: Run) -> StageCheck:
        state = self.state(run)
        bad = {k: v for k, v in state.items() if v}
        if not bad:
            return StageCheck(True, f"{len(state)} dataset(s) built as configured, shards check passed")
        by_reason: dict[str, list[str]] = {}
        for name, why in bad.items():
            by_reason.setdefault(why, []).append(name)
        return StageCheck(False, "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()))

    def run(self, run: Run) -> dict[str, Any]:
        state = self.state(run)
        todo = list(state) if self.name in run.force else [k for k, v in state.items() if v]
        if todo:
            # force=True for those: a dataset whose index is current but whose shards fail the check would
            # otherwise be kept by build_all's own up-to-date test
            build_all(run.cfg.data, todo, parallel=True, force=True)
        return self.outputs(run)

    def outputs(self, run: Run) -> dict[str, Any]:
        out = {}
        for name in self.names(run):
            index = load_index(dataset_dir(run.cfg.data, name))
            out[name] = {
                "dir": index.url,
                "train": index.num_samples("train"),
                "eval": index.num_samples("eval"),
                "classes": index.num_classes,
                "content_hash": index.content_hash,
            }
        return out
