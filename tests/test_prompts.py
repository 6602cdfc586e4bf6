"""
The prompt sets in prompts/: sizes, camera prefixes as the detector reads them, motion mix, category shares,
scene lengths, the test hold-out, and that make_prompts.py rebuilds the committed files byte for byte.

    python -m pytest tests/test_prompts.py -q        # a few seconds on CPU, no downloads
"""
import collections
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from noise_warp import parse_camera

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "prompts")
SPLITS = ["train", "dynamic", "test"]

# Targets: sizes, the motion mix of microsoft/World-R1's dataset/enhanced prompts, tolerances in points of share.
COUNTS = {"train": (2800, 3200), "dynamic": (450, 550), "test": (250, 350)}
MOTION_MIX = {1: 0.68, 2: 0.28, 3: 0.04}  # share of lines by number of detected motions ("fixed" counts as one)
FIXED = {"train": (0.02, 0.05), "test": (0.0, 0.05), "dynamic": (0.05, 0.15)}  # dynamic: about 10 %
CATEGORY_SHARE = 0.20  # five categories, train and test
TOL = 0.05
SINGLES = ["push in", "pull out", "move left", "move right", "orbit left", "orbit right", "pan left", "pan right"]
WORDS, SENTENCES = (40, 110), (2, 4)
PREFIX = re.compile(r"^Camera ([a-z ,]+)\. (.+)$")


def _load_make_prompts():
    spec = importlib.util.spec_from_file_location("make_prompts", os.path.join(PROMPTS, "make_prompts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files():
    """{split: [line, ...]} as committed, read as bytes so line endings and encoding are checked too."""
    out = {}
    for split in SPLITS:
        with open(os.path.join(PROMPTS, f"{split}.txt"), "rb") as f:
            data = f.read()
        assert b"\r" not in data and data.endswith(b"\n"), f"{split}.txt: '\\n' line endings, final newline"
        out[split] = data.decode("utf-8").split("\n")[:-1]
    return out


@pytest.fixture(scope="module")
def records():
    """make_prompts.build(): the same lines with their category and base scene (default seed)."""
    return _load_make_prompts().build()


def split_line(line):
    """'Camera orbit left, then pull out. <scene>' -> (['orbit left', 'pull out'], '<scene>')."""
    m = PREFIX.match(line)
    assert m, f"no camera prefix: {line[:80]}"
    return re.split(r", then |, ", m.group(1)), m.group(2)


def test_counts_and_no_duplicates(files):
    every = [line for split in SPLITS for line in files[split]]
    for split in SPLITS:
        lo, hi = COUNTS[split]
        assert lo <= len(files[split]) <= hi, f"{split}: {len(files[split])} lines, want {lo}-{hi}"
        assert all(line.strip() == line and line for line in files[split]), f"{split}: blank or padded line"
    dupes = [line for line, n in collections.Counter(every).items() if n > 1]
    assert not dupes, f"{len(dupes)} duplicate lines, e.g. {dupes[0][:80]}"


def test_detector_reads_exactly_the_prefix(files):
    """parse_camera sees at least one motion, and only the prefix's: no camera phrase hides in a scene."""
    for split in SPLITS:
        for line in files[split]:
            motions, scene = split_line(line)
            detected = [m.replace("_", " ") for m in parse_camera(line)]
            assert detected, line[:80]
            assert detected == motions, f"{split}: prefix {motions} but the detector reads {detected}: {line[:80]}"
            assert parse_camera(scene) == [] and "camera" not in scene.lower(), scene[:80]


@pytest.mark.parametrize("split", SPLITS)
def test_motion_mix(files, split):
    motions = [split_line(line)[0] for line in files[split]]
    n = len(motions)
    for k, target in MOTION_MIX.items():
        share = sum(len(m) == k for m in motions) / n
        assert abs(share - target) <= TOL, f"{split}: {k}-motion share {share:.3f}, target {target}"
    fixed = sum(m == ["fixed"] for m in motions) / n
    assert FIXED[split][0] <= fixed <= FIXED[split][1], f"{split}: fixed share {fixed:.3f}"
    single = collections.Counter(m[0] for m in motions if len(m) == 1 and m != ["fixed"])
    total = sum(single.values())
    for phrase in SINGLES:
        share = single[phrase] / total
        assert abs(share - 1 / len(SINGLES)) <= TOL, f"{split}: {phrase} is {share:.3f} of single motions"
    assert all("fixed" not in m for m in motions if len(m) > 1), "'fixed' only ever stands alone"


def test_category_shares(records):
    for split in ["train", "test"]:
        count = collections.Counter(r["category"] for r in records[split])
        assert len(count) == 5, f"{split}: categories {sorted(count)}"
        for category, n in count.items():
            share = n / len(records[split])
            assert abs(share - CATEGORY_SHARE) <= TOL, f"{split}: {category} is {share:.3f}"


def test_scene_lengths(files):
    for split in SPLITS:
        for line in files[split]:
            scene = split_line(line)[1]
            words = len(scene.split())
            sentences = len(re.split(r"(?<=[.!?])\s+", scene))
            assert WORDS[0] <= words <= WORDS[1], f"{split}: {words} words: {scene[:80]}"
            assert SENTENCES[0] <= sentences <= SENTENCES[1], f"{split}: {sentences} sentences: {scene[:80]}"


def test_test_scenes_are_held_out(files, records):
    """No test base scene is used in train or dynamic, checked on the base scenes and on the text itself."""
    bases = {split: {r["base"] for r in records[split]} for split in SPLITS}
    assert not bases["test"] & (bases["train"] | bases["dynamic"])
    assert not bases["train"] & bases["dynamic"]
    first = {split: {re.split(r"(?<=\.)\s", split_line(line)[1])[0] for line in files[split]} for split in SPLITS}
    leaked = first["test"] & (first["train"] | first["dynamic"])
    assert not leaked, f"test scenes also in train/dynamic: {sorted(leaked)[:2]}"


def test_rebuild_is_deterministic_and_matches_committed(tmp_path):
    """Two CLI runs give byte-identical files, equal to the committed ones; the README shows the printed table."""
    outs = []
    for run in ["a", "b"]:
        out = tmp_path / run
        res = subprocess.run([sys.executable, os.path.join(PROMPTS, "make_prompts.py"), "--out", str(out)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "| train | push in |" in res.stdout and "| test |" in res.stdout
        with open(os.path.join(PROMPTS, "README.md"), encoding="utf-8") as f:
            assert res.stdout.split("\nwrote ")[0].strip() in f.read(), "prompts/README.md: paste the new table"
        outs.append({s: (out / f"{s}.txt").read_bytes() for s in SPLITS})
    assert outs[0] == outs[1], "same seed, different files"
    for split in SPLITS:
        with open(os.path.join(PROMPTS, f"{split}.txt"), "rb") as f:
            assert f.read() == outs[0][split], f"prompts/{split}.txt differs from a fresh build: rerun make_prompts.py"
