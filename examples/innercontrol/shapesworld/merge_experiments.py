#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
One report from several `run_experiment.py` output folders: the protocol split across machines, sessions or
drivers (for example one driver per mode on each core), put back together without training, generating or scoring
anything again.

Every run keeps the metrics its driver measured; the tables, the comparisons against the baseline and claim (b) are
recomputed over the union (`run_experiment.aggregate` / `claims`), KID is each mode's as its driver pooled it (all
drivers compare with the same real held-out images on the same features when run with the same arguments) or, for a
mode whose seeds several drivers trained, pooled again over all of them from their saved images, Fig. 2
is the first folder's that has it, and the sample grid is drawn from the runs' saved images.

    python examples/innercontrol/shapesworld/merge_experiments.py --output_dir table2-depth t2-controlnet t2-alignment

A (task, mode, seed) found in several folders is taken from the first one. Output: `results.json` and
`shapesworld.md` in `--output_dir`, as `run_experiment.py` writes them.
"""

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run_experiment as experiment  # noqa: E402  (the sibling script: tables, claims, grids, the report)


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Merge run_experiment.py output folders into one report.")
    parser.add_argument("folders", nargs="+", help="run_experiment.py --output_dir folders (each with results.json).")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--num_grid_rows", type=int, default=4)
    args = parser.parse_args(input_args)
    missing = [f for f in args.folders if not os.path.isfile(os.path.join(f, "results.json"))]
    if missing:
        raise ValueError(f"{missing[0]!r} has no results.json: give folders that run_experiment.py finished.")
    return args


# The arguments that make runs comparable: the same toy SD, training budget, held-out scenes, sampler and metrics.
PROTOCOL = ("pretrained_model_name_or_path", "resolution", "world_seed", "max_train_steps", "train_batch_size",
            "learning_rate", "lr_scheduler", "lr_warmup_steps", "mixed_precision", "extra_train_args", "eval_start_index",
            "num_eval_conditions", "generation_seeds", "num_inference_steps", "guidance_scale", "num_kid_real",
            "kid_subset_size", "kid_feature_model", "fid_feature_model") + tuple(f"{t}_eval_model" for t in experiment.TASKS)


def check_same_protocol(results: List[Dict], folders: List[str]):
    """`ValueError` naming the first argument on which a folder's protocol differs from the first folder's."""
    first = results[0]["args"]
    for result, folder in zip(results[1:], folders[1:]):
        for key in PROTOCOL:
            if result["args"].get(key) != first.get(key):
                raise ValueError(f"{folder!r} ran with {key}={result['args'].get(key)!r}, {folders[0]!r} with "
                                 f"{first.get(key)!r}: merge only runs of one protocol.")


def split_modes(runs: List[Dict]) -> List[Tuple[str, str]]:
    """The (task, mode) pairs whose merged runs come from more than one folder (a run's folder: its `folder` key)."""
    folders: Dict[Tuple[str, str], set] = {}
    for run in runs:
        folders.setdefault((run["task"], run["mode"]), set()).add(run["folder"])
    return sorted(key for key, found in folders.items() if len(found) > 1)


def recompute_split_kid(result: Dict, pooled: Callable[[str, List[Dict]], Dict]) -> Dict:
    """KID of every mode whose seeds the merge took from several folders, pooled again over all its runs by
    `pooled(task, runs)` (a driver pooled only its own seeds, fewer images than the protocol asks for). Updates
    `result["kid"]` and replaces the merge's notes on those modes; returns `result`."""
    notes = []
    for task, mode in split_modes(result["runs"]):
        runs = [r for r in result["runs"] if r["task"] == task and r["mode"] == mode]
        result["kid"].setdefault(task, {})[mode] = pooled(task, runs)
        notes.append(f"{task}/{mode}: KID pooled over {', '.join(sorted({r['folder'] for r in runs}))} "
                     "(recomputed from the saved images)")
    result["kid_notes"] = notes
    return result


def merge(results: List[Dict], folders: List[str]) -> Dict:
    """The merged result (no grids): runs (first folder wins; `dir` resolved in its folder), tables and claims over
    the union, KID and Fig. 2 from the first folder that has them. The folders must share one protocol
    (`check_same_protocol`)."""
    check_same_protocol(results, folders)
    runs, seen, kid, buckets, kid_models = [], set(), {}, {}, {}
    kid_folders = {}
    for result, folder in zip(results, folders):
        for run in result["runs"]:
            key = (run["task"], run["mode"], run["seed"])
            if key in seen or "metrics" not in run:
                continue
            seen.add(key)
            runs.append(dict(run, folder=folder,
                             dir=os.path.join(folder, "runs", run["task"], run["mode"], f"seed{run['seed']}")))
        for task, per_mode in result.get("kid", {}).items():
            for mode, value in per_mode.items():
                if value and mode not in kid.setdefault(task, {}):
                    kid[task][mode] = value
                    kid_folders[(task, mode)] = folder
        for task, value in result.get("buckets", {}).items():
            buckets.setdefault(task, value)
        for task, value in result.get("kid_feature_models", {}).items():
            kid_models.setdefault(task, value)
    # KID pools one folder's seeds of a mode: say so where the merged table has seeds of that mode from elsewhere
    # (`main` then pools them all again: `recompute_split_kid`)
    kid_notes = sorted(f"{task}/{mode}: KID from {folder} only" for (task, mode), folder in kid_folders.items()
                       if (task, mode) in split_modes(runs))
    tasks = [t for t in experiment.TASKS if any(r["task"] == t for r in runs)]
    modes = [m for m in experiment.MODES if any(r["mode"] == m for r in runs)]
    runs.sort(key=lambda r: (tasks.index(r["task"]), modes.index(r["mode"]), r["seed"]))
    args = dict(results[0]["args"], tasks=tasks, modes=modes, seeds=sorted({r["seed"] for r in runs}))
    return {"args": args, "runs": runs, "table": experiment.aggregate(runs, tasks, modes),
            "claims": experiment.claims(runs, tasks, modes), "kid": kid, "kid_feature_models": kid_models,
            "buckets": buckets, "grids": {}, "fid_feature_model": results[0].get("fid_feature_model"),
            "mode_labels": {m: experiment.MODES[m][0] for m in modes}, "merged_from": [os.path.abspath(f) for f in folders], "kid_notes": kid_notes}


def main(args) -> Dict:
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    t0 = time.perf_counter()
    results = []
    for folder in args.folders:
        with open(os.path.join(folder, "results.json")) as f:
            results.append(json.load(f))
    result = merge(results, args.folders)
    os.makedirs(args.output_dir, exist_ok=True)
    a = result["args"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def pooled(task: str, runs: List[Dict]) -> Dict:  # the drivers' KID, on their features and real images
        features = experiment.EvaluatorFeatures.from_pretrained(result["kid_feature_models"][task]).to(device)
        real = ShapesWorldEvalSet(task, a["resolution"], a["world_seed"], a["eval_start_index"], a["num_kid_real"])
        torch.manual_seed(0)  # KID's random subsets
        return experiment.pooled_kid(argparse.Namespace(**a), task, runs, real, features, device)

    recompute_split_kid(result, pooled)
    for task in a["tasks"]:
        dataset = ShapesWorldEvalSet(task, a["resolution"], a["world_seed"], a["eval_start_index"], args.num_grid_rows)
        grid = experiment.sample_grid(dataset, [r for r in result["runs"] if r["task"] == task], a["modes"],
                                      args.num_grid_rows, a["generation_seeds"][0])
        if grid is not None:
            os.makedirs(os.path.join(args.output_dir, "grids"), exist_ok=True)
            result["grids"][task] = os.path.join("grids", f"{task}.png")
            grid.save(os.path.join(args.output_dir, result["grids"][task]))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return experiment.write_results(result, args.output_dir)


if __name__ == "__main__":
    experiment.run_cli(parse_args, main)
