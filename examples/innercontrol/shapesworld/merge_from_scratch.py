#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
One report from several `from_scratch.py` results: seeds trained by other drivers, on other machines or in other
sessions (whose run folders may be gone), put back together without training, generating or scoring anything again.

Every run keeps the curve its driver measured. The summary (closure per step with Welch's test against the
ControlNet, the steps to every `--target_closure` level, and with `--level_from` where the curves level off) is
recomputed over the union with `from_scratch.summarize_task`, and the report and the plots are written as
`from_scratch.py` writes them.

    python examples/innercontrol/shapesworld/merge_from_scratch.py --output_dir fs-depth-5seeds \\
      fs-depth-seeds012/results.json fs-depth-seeds34

Each input is a `from_scratch.py --output_dir` folder or its `results.json` (a copy kept elsewhere will do). The
inputs must share the protocol: the training recipe, the evaluated steps and scenes, and the same floor and ceiling
(the same evaluator on the same real images, the same toy SD without ControlNet) to a relative 1e-3, so that every
curve is on one scale. A (task, mode, seed) in two inputs is refused. Output in `--output_dir`: `results.json`
(`merged_from` names the inputs and what each held), `from_scratch.md`, `plots/<task>_curves.png`, and
`grids/<task>.png` copied from the first input whose folder has it.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import from_scratch as fs  # noqa: E402  (the sibling script: summary, report and plots)

# What makes two curves comparable: the training recipe and the evaluation of every checkpoint.
PROTOCOL_KEYS = ("resolution", "world_seed", "num_train_samples", "max_train_steps", "train_batch_size", "learning_rate",
                 "lr_scheduler", "lr_warmup_steps", "mixed_precision", "extra_train_args", "eval_every",
                 "num_eval_conditions", "eval_start_index", "num_inference_steps", "guidance_scale")
SCALE_RTOL = 1e-3


def results_path(source: str) -> str:
    return os.path.join(source, "results.json") if os.path.isdir(source) else source


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Merge from_scratch.py results into one report.")
    parser.add_argument("sources", nargs="+", help="from_scratch.py --output_dir folders, or their results.json files.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--target_closure", type=fs.experiment._csv(float), default=None,
                        help="Closure levels, comma-separated (default: the first input's).")
    parser.add_argument("--level_from", type=int, default=None,
                        help="Also report where the curves level off from this step on (as from_scratch.py's option; "
                             "default: the first input's, if it had one).")
    args = parser.parse_args(input_args)
    missing = [s for s in args.sources if not os.path.isfile(results_path(s))]
    if missing:
        raise ValueError(f"{results_path(missing[0])} does not exist: give from_scratch.py output folders or their results.json.")
    out = os.path.realpath(os.path.join(args.output_dir, "results.json"))
    if any(os.path.realpath(results_path(s)) == out for s in args.sources):
        raise ValueError(f"--output_dir {args.output_dir} holds an input's results.json: write the merge to a new folder.")
    if args.target_closure is not None and (not args.target_closure or not all(0.0 < x <= 1.0 for x in args.target_closure)):
        raise ValueError("--target_closure: give shares of the fidelity gap in (0, 1], comma-separated.")
    results = load_results(args.sources)
    check_same_protocol(results, list(args.sources))
    if args.level_from is not None:
        for result in results:
            for task, info in result["tasks"].items():
                if info["ceiling"] is not None:
                    fs.check_level_from(args.level_from, info["steps"])
    return args


def load_results(sources: List[str]) -> List[Dict]:
    results = []
    for source in sources:
        with open(results_path(source)) as f:
            results.append(json.load(f))
    return results


def check_same_protocol(results: List[Dict], names: List[str]):
    """Raises `ValueError` naming the first option, task scale or repeated run on which the inputs differ."""
    first, name0 = results[0], names[0]
    for result, name in zip(results[1:], names[1:]):
        for key in PROTOCOL_KEYS:
            if result["args"].get(key) != first["args"].get(key):
                raise ValueError(f"{name} was run with --{key} {result['args'].get(key)}, {name0} with "
                                 f"{first['args'].get(key)}: merge only runs of one protocol.")
    scale = {}  # task -> (the first input that evaluated it, its info)
    for result, name in zip(results, names):
        for task, info in result["tasks"].items():
            if info["ceiling"] is None:
                continue
            ref_name, ref = scale.setdefault(task, (name, info))
            if info["steps"] != ref["steps"]:
                raise ValueError(f"{name} evaluated {task} at steps {info['steps']}, {ref_name} at {ref['steps']}: "
                                 "merge only runs of one protocol.")
            for end in ("floor", "ceiling"):
                if not math.isclose(info[end], ref[end], rel_tol=SCALE_RTOL):
                    raise ValueError(f"{task}'s {end} is {info[end]:.6g} in {name} but {ref[end]:.6g} in {ref_name}: another "
                                     "evaluator, toy SD or set of scenes; merge only runs measured on one scale.")
    seen = {}
    for result, name in zip(results, names):
        for run in (r for r in result["runs"] if "curve" in r):  # a run never evaluated there is not in the merge
            key = (run["task"], run["mode"], run["seed"])
            if key in seen:
                raise ValueError(f"{key[0]}/{key[1]}/seed{key[2]} is in both {seen[key]} and {name}: remove one of them.")
            seen[key] = name


def merge(results: List[Dict], names: List[str], targets: Optional[List[float]] = None,
          level_from: Optional[int] = None) -> Dict:
    """The union of the inputs' evaluated runs, summarized again (`fs.summarize_task`); no report written."""
    check_same_protocol(results, names)
    runs = [dict(run, source=name) for result, name in zip(results, names) for run in result["runs"] if "curve" in run]
    modes = list(dict.fromkeys(m for r in results for m in r["args"]["modes"]))
    task_names = list(dict.fromkeys(t for r in results for t in r["args"]["tasks"]))
    targets = targets or results[0]["args"]["target_closure"]
    targets = [targets] if isinstance(targets, (int, float)) else list(targets)  # older results kept one level
    tasks = {}
    for task in task_names:  # the first input that evaluated the task gives its floor and ceiling
        held = [r["tasks"][task] for r in results if task in r["tasks"]]
        tasks[task] = next((info for info in held if info["ceiling"] is not None), held[0])
    if level_from is None:
        level_from = results[0]["args"].get("level_from")  # older results have no such option
    args = dict(results[0]["args"], modes=modes, tasks=task_names, target_closure=targets, level_from=level_from,
                seeds=sorted({run["seed"] for run in runs}))
    labels = {}
    for result in results:
        labels.update({m: label for m, label in result["mode_labels"].items() if m not in labels})
    return {
        "args": args, "runs": runs, "tasks": tasks,
        "summary": {task: fs.summarize_task(runs, task, modes, targets, level_from) for task in task_names},
        "grids": {}, "mode_labels": labels,
        "merged_from": [{"source": name, "seconds": result.get("seconds"),
                         "runs": sorted(f"{r['task']}/{r['mode']}/seed{r['seed']}" for r in result["runs"] if "curve" in r)}
                        for result, name in zip(results, names)],
    }


def main(args) -> Dict:
    t0 = time.perf_counter()
    result = merge(load_results(args.sources), list(args.sources), args.target_closure, args.level_from)
    os.makedirs(args.output_dir, exist_ok=True)
    for task in result["tasks"]:
        for source in args.sources:
            grid = os.path.join(os.path.dirname(results_path(source)), "grids", f"{task}.png")
            if os.path.isfile(grid):
                os.makedirs(os.path.join(args.output_dir, "grids"), exist_ok=True)
                shutil.copyfile(grid, os.path.join(args.output_dir, "grids", f"{task}.png"))
                result["grids"][task] = os.path.join("grids", f"{task}.png")
                break
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return fs.experiment.write_results(result, args.output_dir, fs.write_plots, results_markdown, "from_scratch.md")


def results_markdown(result: Dict) -> str:
    """`from_scratch.py`'s report, and which input held which runs."""
    lines = ["", "Merged from:", ""] + [f"- {m['source']}: {', '.join(m['runs'])}" for m in result["merged_from"]]
    return fs.results_markdown(result) + "\n".join(lines) + "\n"


def cli_main(argv=None):
    return fs.experiment.run_cli(parse_args, main, argv)


if __name__ == "__main__":
    cli_main()
