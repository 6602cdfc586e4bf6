"""
Check that two runs of the same commands give the same numbers: a refactor's contract.
Imports no project file (json only).

    python tools/same_numbers.py RUN_A RUN_B EVAL_A EVAL_B
RUN_*: train.py --out_dir folders (metrics.jsonl: every value bitwise equal but the timings); EVAL_*: evaluate.py
--out folders (results.json equal but the paths in its config block). Prints each difference; exits 1 if any.
"""
import json
import os
import sys

TIMING = ("t_rollout", "t_reward", "t_train")  # wall-clock seconds: never equal twice
PATHS = ("ckpt", "lora_dir")  # where the checkpoint was: differs with the run folder
REMOVED = ("reward_size",)  # config keys of removed flags (--reward_size restated --size): an older run has them
RENAMED = {"steps": "sample_steps"}  # evaluate.py's --steps is --sample_steps now: an older run has the old name
USAGE = "usage: python tools/same_numbers.py RUN_A RUN_B EVAL_A EVAL_B"


def metrics_differences(run_a, run_b):
    """Lines of metrics.jsonl compared key by key, floats by their exact repr (json keeps every bit)."""
    with open(os.path.join(run_a, "metrics.jsonl")) as f:
        a = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run_b, "metrics.jsonl")) as f:
        b = [json.loads(line) for line in f if line.strip()]
    if len(a) != len(b):
        return [f"metrics.jsonl: {len(a)} lines vs {len(b)}"]
    out = []
    for ra, rb in zip(a, b):
        for k in sorted((set(ra) | set(rb)) - set(TIMING)):
            if repr(ra.get(k, "<missing>")) != repr(rb.get(k, "<missing>")):
                out.append(f"metrics.jsonl step {ra.get('step')}: {k} {ra.get(k, '<missing>')!r} vs "
                           f"{rb.get(k, '<missing>')!r}")
    return out


def results_differences(eval_a, eval_b, removed=(), renamed=None):
    """results.json compared whole, but the config block's paths; `removed`: config keys one side may lack;
    `renamed`: {old: new} config keys, compared under their new names."""
    with open(os.path.join(eval_a, "results.json")) as f:
        a = json.load(f)
    with open(os.path.join(eval_b, "results.json")) as f:
        b = json.load(f)
    ca, cb = ({(renamed or {}).get(k, k): v for k, v in c.items()} for c in (a.pop("config"), b.pop("config")))
    out = [f"results.json config: {k} {ca.get(k, '<missing>')!r} vs {cb.get(k, '<missing>')!r}"
           for k in sorted(set(ca) | set(cb)) if k not in PATHS and k not in removed and ca.get(k) != cb.get(k)]
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
        for k in sorted(set(a) | set(b)):
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True):
                out.append(f"results.json: {k} differs")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(USAGE)
    run_a, run_b, eval_a, eval_b = sys.argv[1:]
    diffs = metrics_differences(run_a, run_b) + results_differences(eval_a, eval_b, removed=REMOVED, renamed=RENAMED)
    print("\n".join(diffs) if diffs else "same numbers: metrics.jsonl (timings aside) and results.json (paths aside)")
    sys.exit(1 if diffs else 0)
