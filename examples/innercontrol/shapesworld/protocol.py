#!/usr/bin/env python
# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""
The whole ShapesWorld experiment in one command, on the bundled models (docs/shapesworld.md, "The experiment"):

1. `table2`: `run_experiment.py` - the five modes fine-tuned from each task's shipped ControlNet at the calibrated
   setting (500 steps, batch 8, lr 1e-5), 5 seeds, 256 held-out scenes (100 000 onwards), KID and FID;
2. `fig2`: `run_experiment.py --fig2_only` - the probe against the evaluator on the one-step x0 per timestep bucket,
   on the shipped ControlNets, 64 scenes a bucket;
3. `from_scratch`: `from_scratch.py` - ControlNet, alignment only and InnerControl trained from the UNet, fidelity
   every 250 steps to 1500, 3 seeds, and where the curves stand over their last three evaluations (`--level_from
   1000`: the mean closure and its slope per seed; a clearly positive slope says a curve is still climbing).

Every stage writes into its own folder of `--output_dir` and skips what a previous call already finished (trained
runs, generated images), so the command can be started again after an interruption. The stages run on CUDA when
it is available. `--dry_run` prints the three command lines; `--stages` picks some of them.

    python examples/innercontrol/shapesworld/protocol.py --output_dir shapesworld-protocol --jobs 2

`protocol.json` in `--output_dir` records each stage's wall time, summed over the calls that ran it (a call started
again after an interruption only does what was left), and the whole protocol's in `seconds`.
"""

import argparse
import json
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import from_scratch  # noqa: E402  (sibling scripts: the stages)
import run_experiment  # noqa: E402

STAGES = ("table2", "fig2", "from_scratch")
TASKS = run_experiment.TASKS


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The whole ShapesWorld experiment (Table 2, Fig. 2, from scratch).")
    parser.add_argument("--output_dir", type=str, default="shapesworld-protocol")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="ShapesWorld training scenes (default: <output_dir>/shapes64, written when missing).")
    parser.add_argument("--jobs", type=int, default=1, help="Training runs at once (each stage's --jobs).")
    parser.add_argument("--stages", type=run_experiment._csv(str), default=list(STAGES), help=f"Some of {', '.join(STAGES)}.")
    parser.add_argument("--tasks", type=run_experiment._csv(str), default=list(TASKS), help="Tasks of Table 2 and Fig. 2.")
    parser.add_argument("--seeds", type=run_experiment._csv(int), default=[0, 1, 2, 3, 4], help="Table 2's seeds.")
    parser.add_argument("--from_scratch_tasks", type=run_experiment._csv(str), default=["depth", "hed"])
    parser.add_argument("--from_scratch_seeds", type=run_experiment._csv(int), default=[0, 1, 2])
    parser.add_argument("--num_eval_conditions", type=int, default=256, help="Table 2's held-out scenes.")
    parser.add_argument("--dry_run", action="store_true", help="Print the stages' command lines and stop.")
    args = parser.parse_args(input_args)
    bad = [s for s in args.stages if s not in STAGES]
    if bad or not args.stages:
        raise ValueError(f"--stages {bad or args.stages}: choose from {', '.join(STAGES)}.")
    for option in ("tasks", "from_scratch_tasks"):
        bad = [t for t in getattr(args, option) if t not in TASKS]
        if bad:
            raise ValueError(f"--{option} {bad}: choose from {', '.join(TASKS)}.")
    if args.train_data_dir is None:
        args.train_data_dir = os.path.join(args.output_dir, "shapes64")
    return args


def bundled(name: str) -> str:
    from diffusers_innercontrol.toy.quickstart import bundled_path

    path = bundled_path(name)
    if path is None:
        raise ValueError(f"The bundled ShapesWorld model {name!r} is missing: reinstall diffusers-innercontrol "
                         "(or rebuild the bundle with examples/innercontrol/shapesworld/make_bundle.sh).")
    return path


def model_args(tasks, kinds=("controlnet", "probe", "reward_model")) -> List[str]:
    folders = {"controlnet": "controlnet", "probe": "probe", "reward_model": "reward"}
    return [arg for task in tasks for kind in kinds for arg in (f"--{task}_{kind}", bundled(f"{folders[kind]}-{task}"))]


def stage_args(args) -> Dict[str, List[str]]:
    """The command line of each stage (the arguments of `run_experiment.py` / `from_scratch.py`)."""
    common = ["--pretrained_model_name_or_path", bundled("toy-sd"), "--train_data_dir", args.train_data_dir,
              "--num_train_samples", "8000", "--eval_start_index", "100000", "--jobs", str(args.jobs)]
    csv = ",".join
    return {
        "table2": common + ["--tasks", csv(args.tasks), "--modes", csv(run_experiment.MODES), "--seeds",
                            csv(map(str, args.seeds)), "--max_train_steps", "500", "--train_batch_size", "8",
                            "--learning_rate", "1e-5", "--num_eval_conditions", str(args.num_eval_conditions),
                            "--num_bucket_conditions", "64", "--output_dir", os.path.join(args.output_dir, "table2")]
                  + model_args(args.tasks),
        "fig2": common + ["--fig2_only", "--tasks", csv(args.tasks), "--num_bucket_conditions", "64",
                          "--eval_batch_size", "16", "--output_dir", os.path.join(args.output_dir, "fig2")]
                + model_args(args.tasks, ("controlnet", "probe")),
        "from_scratch": common + ["--tasks", csv(args.from_scratch_tasks), "--seeds", csv(map(str, args.from_scratch_seeds)),
                                  "--max_train_steps", "1500", "--eval_every", "250", "--num_eval_conditions", "64",
                                  "--level_from", "1000",  # the last 3 evaluations: their mean and slope
                                  "--output_dir", os.path.join(args.output_dir, "from-scratch")]
                        + model_args(args.from_scratch_tasks, ("probe", "reward_model")),
    }


SCRIPTS = {"table2": run_experiment, "fig2": run_experiment, "from_scratch": from_scratch}


def parse_stages(args) -> Dict[str, argparse.Namespace]:
    """Every chosen stage's arguments, checked by its own script before anything runs (`ValueError` otherwise)."""
    commands = stage_args(args)
    return {stage: SCRIPTS[stage].parse_args(commands[stage]) for stage in args.stages}


def stage_wall_time(calls: List[Dict]) -> Dict:
    """A stage's wall time over the calls that ran it: a resumed call only does what the earlier ones left, so the
    stage's cost is their sum. A call that did not finish (its session ended) has no time; it is counted apart, and the
    sum is then a lower bound."""
    finished = [call["seconds"] for call in calls if call.get("seconds") is not None]
    return {"seconds": round(sum(finished), 1), "calls": len(calls), "unfinished_calls": len(calls) - len(finished)}


def load_record(path: str, args) -> Dict:
    """protocol.json of the earlier calls into this --output_dir (their stages' calls are kept), with this call's args."""
    record = {"stages": {}}
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    record["args"] = dict(vars(args))
    return record


def save_record(record: Dict, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)  # atomic: an interruption leaves the previous record whole


def main(args) -> Dict:
    scripts, commands, parsed = SCRIPTS, stage_args(args), parse_stages(args)
    if args.dry_run:
        for stage in args.stages:
            print(f"# {stage}\npython {os.path.join(HERE, scripts[stage].__name__ + '.py')} {shlex.join(commands[stage])}")
        return {}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "protocol.json")
    record = load_record(path, args)
    for stage in args.stages:
        entry = record["stages"].setdefault(stage, {"history": []})
        call = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": None, "command": commands[stage]}
        entry["history"].append(call)
        entry.update(stage_wall_time(entry["history"]))
        save_record(record, path)  # before the stage: an interrupted call is on record as unfinished
        t0 = time.perf_counter()
        scripts[stage].main(parsed[stage])
        call["seconds"] = round(time.perf_counter() - t0, 1)
        entry.update(stage_wall_time(entry["history"]))
        record["seconds"] = round(sum(e["seconds"] for e in record["stages"].values()), 1)
        save_record(record, path)  # after every stage: nothing lost
    return record


def parse_all(argv=None) -> argparse.Namespace:
    """`parse_args`, then every stage's checks (the bundled models are there, each stage's options are valid)."""
    args = parse_args(argv)
    parse_stages(args)
    return args


def cli_main(argv=None):
    return run_experiment.run_cli(parse_all, main, argv)


if __name__ == "__main__":
    cli_main()
