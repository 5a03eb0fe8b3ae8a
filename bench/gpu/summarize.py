"""Collects the outputs of bench/gpu/run.sh stage2 (or its build stage) into one JSON document;
with --print SUMMARY, prints one line per result of a summary written before."""
import glob
import json
import os
import sys

if sys.argv[1] == "--print":
    # One line per result of a summary written before.
    s = json.load(open(sys.argv[2]))
    for g in s["greedy"]:
        print("greedy", g["build"], repr(g["prompt"]), "IDENTICAL" if g["identical"] else f"differs at {g['first_difference']}")
    print("ppl", s["ppl"])
    for k, v in s["bench"].items():
        print("bench", k, "pp", round(v["prefill_tokens_per_second"]), "tg", round(v["decode_tokens_per_second"], 1))
    sys.exit(0)
o = sys.argv[1]


def load(name):
    p = os.path.join(o, name)
    return json.load(open(p)) if os.path.exists(p) else None


greedy = []
for m in ["4bit", "2bit"]:
    for i in [1, 2, 3]:
        a, b = load(f"greedy-{m}-{i}-ptx.json"), load(f"greedy-{m}-{i}-reference.json")
        if a and b:
            ta, tb = a["output"]["tokens"], b["output"]["tokens"]
            greedy.append({
                "build": m, "prompt": a["prompt"], "identical": ta == tb, "tokens": len(ta),
                "first_difference": None if ta == tb else next(j for j, (x, y) in enumerate(zip(ta, tb)) if x != y),
                "text": a["output"]["text"],
            })
ppl = {}
for m in ["4bit", "2bit"]:
    for b in ["ptx", "reference"]:
        r = load(f"ppl-{m}-{b}.json")
        if r:
            ppl[f"{m}-{b}"] = r["report"]["ppl"]
bench = {}
for f in sorted(glob.glob(os.path.join(o, "bench-*.json"))):
    r = json.load(open(f))
    bench[os.path.basename(f)[6:-5]] = r.get("report", r)
gpu = open(os.path.join(o, "gpu.txt")).read().strip() if os.path.exists(os.path.join(o, "gpu.txt")) else None
print(json.dumps({"gpu": gpu, "greedy": greedy, "ppl": ppl, "bench": bench}, indent=1))
