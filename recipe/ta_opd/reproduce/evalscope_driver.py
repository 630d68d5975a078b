"""Runs ONE EvalScope evaluation and prints its outcome as JSON. Executed by
``python -m recipe.ta_opd.reproduce.evaluate --backend evalscope`` with the interpreter of the EvalScope
environment (``--evalscope-python``): EvalScope pins antlr4-python3-runtime 4.13 (via math-verify),
which breaks Hydra/omegaconf (4.9) and so verl, so it lives in its own virtualenv. This file
imports only the standard library and evalscope.

    EVAL_PY evalscope_driver.py '{"model": ..., "api_url": ..., "dataset": ..., "seed": ..., ...}'

Prints one line ``TA_OPD_RESULT {"score": <primary metric in [0, 1]>, "completions": [...],
"evalscope_version": ...}``.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def main() -> int:
    args = json.loads(sys.argv[1])
    import evalscope
    from evalscope import TaskConfig, run_task
    from evalscope.api.evaluator.cache import ModelResult

    dataset_args = {}
    if args.get("local_path"):  # an offline copy of the benchmark (EvalScope's local-dataset route)
        dataset_args[args["dataset"]] = {"local_path": args["local_path"]}
    cfg = TaskConfig(
        model=args["model"], api_url=args["api_url"], api_key="EMPTY", eval_type="openai_api",
        datasets=[args["dataset"]], dataset_args=dataset_args, generation_config=args["generation"],
        seed=args["seed"], work_dir=args["work_dir"], no_timestamp=True, limit=args.get("limit"),
        eval_batch_size=args.get("batch_size", 32), sandbox=args.get("sandbox"))
    reports = run_task(cfg)
    report = reports[args["dataset"]]
    completions = []
    for f in sorted(glob.glob(os.path.join(args["work_dir"], "predictions", "*", "*.jsonl"))):
        with open(f) as fh:
            for line in fh:
                r = ModelResult.model_validate(json.loads(line))
                completions.append(r.model_output.completion if r.model_output is not None else "")
    print("TA_OPD_RESULT " + json.dumps({"score": report.score, "completions": completions,
                                         "evalscope_version": evalscope.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
