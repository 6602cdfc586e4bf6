"""
tools/gpu_check.sh's work folder -> at most 3 files in its OUTDIR (gpu_check.sh adds current_part.log while a part
runs): the shape a time-limited GPU machine sends back, at most 8 files, none in sub-folders. Imports no project file.

    python3 tools/gpu_check_summary.py WORK OUTDIR MODE

  summary.json  mode; per part in the order they ran (a part run again replaces its earlier entry): exit code,
                seconds, limit, status (ok / failed / timed out / no exit recorded, i.e. killed with its call, or
                still running) and its key figures, read from what it left in WORK; the failing parts' last lines
  bench.json    the rows of every bench part (WORK/bench*.json), with the part each came from
  logs.tar.gz   WORK's logs/ and JSON files, the RL step's metrics.jsonl, the prompts (not the checkpoint); any
                file's last 4 MiB only
Each file is written beside its place and renamed into it, so a call killed at any moment leaves whole files.
"""
import io
import json
import os
import re
import sys
import tarfile

FIGURES = ("reward", "S_meta", "S_recon", "S_traj", "R_gen", "loss", "kl", "grad_norm", "t_rollout", "t_reward",
           "t_train", "peak_gib", "bad_videos")  # of the RL step's metrics.jsonl line
TAIL = 4 << 20  # bytes of one file kept in the tar


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_json(path):
    text = read(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def parts(work):
    """parts.tsv ("start NAME LIMIT" / "end NAME RC SECONDS" lines) -> [{part, limit, rc, seconds, status}]."""
    out = {}
    for line in (read(os.path.join(work, "parts.tsv")) or "").splitlines():
        kind, name, *rest = line.split("\t")
        if kind == "start":
            out.pop(name, None)  # re-run: the latest entry, at the end of the order
            out[name] = dict(part=name, limit=int(rest[0]) or None, rc=None, seconds=None,
                             status="no exit recorded (killed with its call, or still running)")
        elif name in out:
            rc, seconds = int(rest[0]), int(rest[1])
            status = "ok" if rc == 0 else "timed out" if rc in (124, 137) else "failed"
            out[name].update(rc=rc, seconds=seconds, status=status)
    return list(out.values())


def figures(work, name):
    """The key figures a part left in WORK."""
    log = read(os.path.join(work, "logs", f"{name}.txt")) or ""
    if name in ("environment", "build"):
        return read_json(os.path.join(work, f"{name}.json"))
    if name == "cuda_tests":
        counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", log, re.M)
        return counts[-1] if counts else None
    if name == "renderer":
        return next((line for line in log.splitlines() if line.startswith("renderer:")), None)
    if name == "rl_step":
        record = read_json(os.path.join(work, "run", "metrics.jsonl")) or {}  # one step: one line
        return {k: record[k] for k in FIGURES if k in record} or None
    if name.startswith("bench") or name == "warp_full":
        data = read_json(os.path.join(work, "warp.json" if name == "warp_full" else f"{name}.json"))
        keep = ("seconds", "tflops", "util", "peak_gib", "error", "ours", "release")
        return {r["stage"]: {k: r[k] for k in keep if k in r} for r in data["rows"]} if data else None
    return None


def write(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def main(work, out, mode):
    done = parts(work)
    for p in done:
        p["figures"] = figures(work, p["part"])
        if p["status"] != "ok":
            lines = (read(os.path.join(work, "logs", f"{p['part']}.txt")) or "").splitlines()
            p["last_lines"] = lines[-15:] if lines else "see current_part.log"
    summary = dict(mode=mode, parts=done)
    write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1).encode())

    rows, meta = [], {}
    for name in sorted(f for f in os.listdir(work) if f.startswith("bench") and f.endswith(".json")):
        data = read_json(os.path.join(work, name)) or {}
        rows += [dict(r, part=name[:-5]) for r in data.get("rows", [])]
        meta = {k: v for k, v in data.items() if k != "rows"}
    if rows:
        write(os.path.join(out, "bench.json"), json.dumps(dict(meta, rows=rows), indent=1).encode())

    files = [os.path.join("logs", f) for f in sorted(os.listdir(os.path.join(work, "logs")))]
    files += [f for f in sorted(os.listdir(work)) if f.endswith((".json", ".tsv", ".txt"))]
    metrics = os.path.join("run", "metrics.jsonl")
    files += [metrics] if os.path.isfile(os.path.join(work, metrics)) else []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel in files:
            with open(os.path.join(work, rel), "rb") as f:
                f.seek(max(0, os.path.getsize(os.path.join(work, rel)) - TAIL))
                data = f.read()
            info = tarfile.TarInfo(rel)
            info.size, info.mtime = len(data), os.path.getmtime(os.path.join(work, rel))
            tar.addfile(info, io.BytesIO(data))
    write(os.path.join(out, "logs.tar.gz"), buf.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python3 tools/gpu_check_summary.py WORK OUTDIR MODE")
    main(*sys.argv[1:])
