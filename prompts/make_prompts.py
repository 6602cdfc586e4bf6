"""
Build prompts/train.txt, dynamic.txt and test.txt from the hand-written scenes in prompts/scenes/.
Imports no project file.

A line is a camera prefix and a scene: "Camera orbit left, then pull out. <scene>". A scene is one hand-written
base scene (2-3 sentences: what stands in front of what, materials, sizes, distances) plus one light sentence
drawn from scenes/light.txt among those that fit the base scene's setting tag, so one base scene gives a few
distinct prompts that never contradict it ("midday sun" never meets "under a starry sky"). Some base scenes
also carry {a|b} material or colour alternatives, picked per prompt.

    python prompts/make_prompts.py                  # rewrite the three files and print the distribution table
    python prompts/make_prompts.py --seed 1 --out /tmp/p

Scene files, one scene a line, '#' starts a comment line:
    scenes/<category>.txt   "<setting> | <base scene>"   five categories, the 3D-aware pool (train and test)
    scenes/dynamic.txt      "<setting> | <base scene>"   non-rigid scenes, dynamic.txt only
    scenes/light.txt        "<setting>,<setting> | <light sentence>"

Splits: per category, TEST_BASES base scenes are drawn (with the seed) and held out whole for test.txt; the
rest make train.txt. Camera prefixes follow the motion mix of the official release's prompts (microsoft/World-R1
dataset/enhanced/*.txt: 68% one motion, 28% two, 4% three), single motions spread evenly, about 3% "fixed" in train and test and
10% in dynamic. Every split is checked: no camera phrase inside a scene, 40-110 words, 2-4 sentences, no
duplicate line. Only the standard library; the same seed gives byte-identical files.
"""
import argparse
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCENES = os.path.join(HERE, "scenes")

CATEGORIES = ["landscapes", "cities", "micro", "fantasy", "art"]  # file names in scenes/, table order
SIZES = {"train": 3000, "dynamic": 500, "test": 300}  # lines per split
TEST_BASES = 30  # base scenes per category held out for test.txt

# The detector's vocabulary (microsoft/World-R1 camera_trajectory_utils.py). Composites never undo themselves
# (no "push in, then pull out"); the triples are WorldScore's pull_left / pull_right ("move, pull out, then pan" to the same side), the
# two crossed versions, and push in - orbit - pull out around a subject.
SINGLE = ["push in", "pull out", "move left", "move right", "orbit left", "orbit right", "pan left", "pan right"]
OPPOSITE = {("push in", "pull out"), ("move left", "move right"), ("orbit left", "orbit right"),
            ("pan left", "pan right")}
PAIRS = [(a, b) for a in SINGLE for b in SINGLE if a != b and (a, b) not in OPPOSITE and (b, a) not in OPPOSITE]
TRIPLES = [("move left", "pull out", "pan left"), ("move right", "pull out", "pan right"),
           ("move left", "pull out", "pan right"), ("move right", "pull out", "pan left"),
           ("push in", "orbit left", "pull out"), ("push in", "orbit right", "pull out")]
MIX = {  # share of lines per kind of prefix
    "train": {"fixed": 0.03, "single": 0.65, "pair": 0.28, "triple": 0.04},
    "test": {"fixed": 0.03, "single": 0.65, "pair": 0.28, "triple": 0.04},
    "dynamic": {"fixed": 0.10, "single": 0.58, "pair": 0.28, "triple": 0.04},
}
CAMERA_RE = re.compile(r"(?<![a-z])(" + "|".join(SINGLE + ["fixed"]) + r")(?![a-z])")
MIN_WORDS, MAX_WORDS, MIN_SENTENCES, MAX_SENTENCES = 40, 110, 2, 4


def fail(msg):
    sys.exit(f"make_prompts.py: {msg}")


def read_table(path):
    """'<key> | <text>' lines -> [(key, text, 'file:line')], skipping blanks and '#' comments."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{os.path.relpath(path, HERE)}:{n}"
            if line.count(" | ") != 1:
                fail(f"{where}: expected '<setting> | <text>' with exactly one ' | '")
            key, text = line.split(" | ")
            if CAMERA_RE.search(text.lower()) or "camera" in text.lower():
                found = CAMERA_RE.search(text.lower())
                fail(f"{where}: {found.group(0) if found else 'camera'!r} inside the scene text (prefix only)")
            if re.search(r"[{}]", re.sub(r"\{[^{}|]+(\|[^{}|]+)+\}", "", text)):
                fail(f"{where}: unbalanced or empty {{a|b}} alternative")
            rows.append((key.strip(), text.strip(), where))
    return rows


def expand(template, rng):
    """Pick one option of every {a|b|c} alternative."""
    return re.sub(r"\{([^{}]+)\}", lambda m: rng.choice(m.group(1).split("|")), template)


def words(text):
    return len(text.split())


def sentences(text):
    return len(re.split(r"(?<=[.!?])\s+", text.strip()))


def prefix(motions):
    """('move left', 'pull out', 'pan left') -> 'Camera move left, pull out, then pan left.'"""
    if len(motions) == 1:
        return f"Camera {motions[0]}."
    return f"Camera {', '.join(motions[:-1])}, then {motions[-1]}."


def quota(n, shares):
    """Split n into integer counts proportional to shares (largest remainder, ties in dict order)."""
    raw = {k: n * v for k, v in shares.items()}
    counts = {k: int(r) for k, r in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def camera_prefixes(n, shares, offset, rng):
    """n motion tuples with the given mix; single motions and composites cycled evenly from `offset`."""
    q = quota(n, shares)
    pairs, triples = PAIRS[:], TRIPLES[:]
    rng.shuffle(pairs)
    rng.shuffle(triples)
    out = [("fixed",)] * q["fixed"]
    out += [(SINGLE[(offset + i) % len(SINGLE)],) for i in range(q["single"])]
    out += [pairs[(offset + i) % len(pairs)] for i in range(q["pair"])]
    out += [triples[(offset + i) % len(triples)] for i in range(q["triple"])]
    rng.shuffle(out)
    return out


def make_lines(bases, n, light, rng, where_split):
    """Spread n prompts over the base scenes (each gets n//len or one more), each with its own light sentence."""
    if not bases:
        fail(f"{where_split}: no base scenes")
    order = list(range(len(bases)))
    rng.shuffle(order)
    extra = set(order[: n % len(bases)])
    lines = []
    for i, (setting, template, where) in enumerate(bases):
        k = n // len(bases) + (i in extra)
        pool = light.get(setting, [])
        if len(pool) < k:
            fail(f"{where}: setting {setting!r} has {len(pool)} light sentences in scenes/light.txt, needs {k}")
        for sentence in rng.sample(pool, k):
            scene = f"{expand(template, rng)} {sentence}"
            if CAMERA_RE.search(scene.lower()):
                fail(f"{where}: camera phrase {CAMERA_RE.search(scene.lower()).group(0)!r} in {scene!r}")
            if not MIN_WORDS <= words(scene) <= MAX_WORDS:
                fail(f"{where}: {words(scene)} words with light {sentence!r} (allowed {MIN_WORDS}-{MAX_WORDS})")
            if not MIN_SENTENCES <= sentences(scene) <= MAX_SENTENCES:
                fail(f"{where}: {sentences(scene)} sentences (allowed {MIN_SENTENCES}-{MAX_SENTENCES})")
            lines.append({"base": template, "scene": scene})
    return lines


def build(seed=0):
    """-> {split: [{'category', 'base', 'scene', 'motions', 'line'}]}, the whole data set, deterministic in seed."""
    rng = random.Random(seed)
    light = {}
    for settings, sentence, _ in read_table(os.path.join(SCENES, "light.txt")):
        for s in settings.split(","):
            light.setdefault(s.strip(), []).append(sentence)
    pools = {c: read_table(os.path.join(SCENES, f"{c}.txt")) for c in CATEGORIES}
    pools["dynamic"] = read_table(os.path.join(SCENES, "dynamic.txt"))
    seen = {}
    for c, rows in pools.items():
        for _, template, where in rows:
            if template in seen:
                fail(f"{where}: the same base scene as {seen[template]}")
            seen[template] = where

    splits = {"train": [], "test": [], "dynamic": []}
    for ci, c in enumerate(CATEGORIES):
        held = set(rng.sample(range(len(pools[c])), TEST_BASES))
        parts = {"test": [b for i, b in enumerate(pools[c]) if i in held],
                 "train": [b for i, b in enumerate(pools[c]) if i not in held]}
        for split, bases in parts.items():
            n = SIZES[split] // len(CATEGORIES) + (ci < SIZES[split] % len(CATEGORIES))
            lines = make_lines(bases, n, light, rng, f"{split}/{c}")
            for line, motions in zip(lines, camera_prefixes(n, MIX[split], ci, rng)):
                line.update(category=c, motions=motions)
            splits[split] += lines
    lines = make_lines(pools["dynamic"], SIZES["dynamic"], light, rng, "dynamic")
    for line, motions in zip(lines, camera_prefixes(len(lines), MIX["dynamic"], 0, rng)):
        line.update(category="dynamic", motions=motions)
    splits["dynamic"] = lines

    every = set()
    for split, lines in splits.items():
        for line in lines:
            line["line"] = f"{prefix(line['motions'])} {line['scene']}"
            if line["line"] in every:
                fail(f"duplicate line in {split}: {line['line'][:80]}...")
            every.add(line["line"])
        rng.shuffle(lines)  # mix categories and separate a base scene's variants in the file
    return splits


def kind(motions):
    return motions[0] if len(motions) == 1 else f"{len(motions)} motions"


def table(split, lines):
    """The split's categories x motions table (markdown) and its length statistics."""
    cols = SINGLE + ["fixed", "2 motions", "3 motions"]
    cats = sorted({l["category"] for l in lines}, key=lambda c: (CATEGORIES + ["dynamic"]).index(c))
    rows = [f"| {split} | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 2) + "|"]
    for c in cats + ["all"]:
        cells = [sum(1 for l in lines if c in ("all", l["category"]) and kind(l["motions"]) == k) for k in cols]
        rows.append(f"| {c} | " + " | ".join(map(str, cells)) + f" | {sum(cells)} |")
    share = [100 * sum(1 for l in lines if kind(l["motions"]) == k) / len(lines) for k in cols]
    rows.append("| % | " + " | ".join(f"{s:.1f}" for s in share) + " | 100 |")
    w = [words(l["scene"]) for l in lines]
    s = [sentences(l["scene"]) for l in lines]
    bases = len({l["base"] for l in lines})
    per = [100 * sum(len(l["motions"]) == k for l in lines) / len(lines) for k in (1, 2, 3)]
    rows.append(f"\n{split}: {len(lines)} prompts from {bases} base scenes; motions per prompt 1 / 2 / 3: "
                f"{per[0]:.1f} / {per[1]:.1f} / {per[2]:.1f} % (1 includes fixed); scene words min {min(w)} / "
                f"mean {sum(w) / len(w):.1f} / max {max(w)}; sentences {min(s)}-{max(s)}")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the test hold-out, light choice and camera prefixes")
    p.add_argument("--out", default=HERE, help="folder for train.txt, dynamic.txt, test.txt (default: prompts/)")
    args = p.parse_args()
    splits = build(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for split in ["train", "dynamic", "test"]:
        with open(os.path.join(args.out, f"{split}.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(l["line"] + "\n" for l in splits[split]))
        print(table(split, splits[split]) + "\n")
    print(f"wrote {', '.join(f'{s}.txt ({len(splits[s])})' for s in ['train', 'dynamic', 'test'])} to {args.out}")


if __name__ == "__main__":
    main()
