#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
Score the images that `run_experiment.py` saved with another control model, without generating anything again.

What it is for: a mode that lowers its training loss but scores worse with the separately trained evaluator raises
the question whether the reward model and the evaluator disagree (reward hacking: the ControlNet learns what the
reward model wants to see) or whether the samples really follow the control less. Scoring the same images with the
reward model answers it: if the reward model scores them worse too, it is not hacking.

    python examples/innercontrol/shapesworld/rescore.py --task hed --model reward=src/diffusers_innercontrol/toy/assets/shapesworld/reward-hed \\
        --model evaluator=src/diffusers_innercontrol/toy/assets/shapesworld/eval-hed --output rescore-hed.json t2-controlnet t2-reward_all

Each mode is compared with the `controlnet` (diffusion loss only) runs, over seeds (Welch's t-test,
`metrics.welch_test`). Output: a JSON file and a markdown table on stdout.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch

from diffusers_innercontrol.tasks import TASK_NAMES


def _labelled(text: str):
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give LABEL=PATH, e.g. reward=assets/reward-hed.")
    return label, path


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score run_experiment.py's saved images with other control models.")
    parser.add_argument("folders", nargs="+", help="run_experiment.py --output_dir folders (each with results.json).")
    parser.add_argument("--task", required=True, choices=TASK_NAMES, help="The task whose runs are rescored.")
    parser.add_argument("--model", type=_labelled, action="append", required=True, metavar="LABEL=PATH",
                        help="A control model to score with (a reward or evaluation model folder); repeatable.")
    parser.add_argument("--baseline", default="controlnet", help="The mode the others are compared with.")
    parser.add_argument("--output", required=True, help="The JSON file to write.")
    args = parser.parse_args(input_args)
    for folder in args.folders:
        if not os.path.isfile(os.path.join(folder, "results.json")):
            parser.error(f"{folder!r} has no results.json: give folders that run_experiment.py finished.")
    for label, path in args.model:
        if not os.path.isdir(path):
            parser.error(f"--model {label}={path}: no such folder.")
    return args


def main(args) -> Dict:
    from diffusers_innercontrol.evaluation import compute_metrics, load_control_evaluator
    from diffusers_innercontrol.metrics import CONTROL_METRICS, welch_test
    from diffusers_innercontrol.tasks import get_task
    from diffusers_innercontrol.toy.shapesworld import ShapesWorldEvalSet

    task = get_task(args.task)
    key = CONTROL_METRICS[task.name][0]
    models = {label: load_control_evaluator(task, path, option="--model") for label, path in args.model}
    runs, protocol = [], None
    for folder in args.folders:
        with open(os.path.join(folder, "results.json")) as f:
            result = json.load(f)
        a = result["args"]
        this = (a["resolution"], a["world_seed"], a["eval_start_index"], a["num_eval_conditions"], a["generation_seeds"])
        if protocol is not None and this != protocol:
            raise ValueError(f"{folder!r} evaluated other scenes or seeds than {args.folders[0]!r}: rescore one protocol.")
        protocol = this
        runs += [r for r in result["runs"] if r["task"] == task.name]
    if not runs:
        raise ValueError(f"No {task.name} runs in {', '.join(args.folders)}.")
    resolution, world_seed, start, n, seeds = protocol
    dataset = ShapesWorldEvalSet(task, resolution, world_seed, start, n)
    scores: Dict[str, Dict[str, List[float]]] = {}
    for run in runs:
        for label, model in models.items():
            metrics = compute_metrics(task, dataset, range(n), os.path.join(run["dir"], "eval"), seeds=seeds,
                                      control_evaluator=model, progress=False)
            scores.setdefault(run["mode"], {}).setdefault(label, []).append(metrics[key])
    out = {"task": task.name, "metric": key, "models": dict(args.model), "folders": args.folders, "scores": scores,
           "vs_baseline": {}}
    if args.baseline in scores:
        for mode in scores:
            if mode != args.baseline:
                out["vs_baseline"][mode] = {label: welch_test(scores[mode][label], scores[args.baseline][label])
                                            for label in models if len(scores[mode][label]) > 1}
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    print(markdown(out))
    return out


def markdown(out: Dict) -> str:
    labels = list(out["models"])
    lines = ["| mode | " + " | ".join(f"{out['metric']} by {label} (mean ± std over seeds) | difference [95 % interval], p"
                                        for label in labels) + " |",
             "|---|" + "---|---|" * len(labels)]
    for mode, by_model in out["scores"].items():
        cells = []
        for label in labels:
            v = torch.tensor(by_model[label], dtype=torch.float64)
            std = f" ± {v.std().item():.4f}" if len(v) > 1 else ""
            cells.append(f"{v.mean().item():.4f}{std}")
            w = out["vs_baseline"].get(mode, {}).get(label)
            cells.append("-" if w is None else f"{w['diff']:+.4f} [{w['ci_low']:+.4f}, {w['ci_high']:+.4f}], {w['p']:.2g}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main(parse_args()) else 1)
