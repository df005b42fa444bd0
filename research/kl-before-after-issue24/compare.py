"""Compare two `chunkcache eval` runs example by example: every strategy's first-token KL (and
first-token agreement, recomputed share) must be identical. Usage: compare.py BEFORE AFTER."""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = ("first_token_kl", "first_token_agrees", "recomputed_fraction")


def rows(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (folder / "examples.jsonl").read_text().splitlines())}


def main(before: Path, after: Path) -> int:
    a, b = rows(before), rows(after)
    if list(a) != list(b):
        print("the runs hold different examples")
        return 1
    strategies = list(next(iter(a.values()))["strategies"])
    print(f"{len(a)} examples; identical = every example's value equal, bit for bit\n")
    print("| strategy | mean first-token KL before | after | max abs diff | identical (KL, agree, recomputed) |")
    print("|---|---:|---:|---:|---|")
    differ = 0
    for name in strategies:
        kb = [a[i]["strategies"][name]["first_token_kl"] for i in a]
        ka = [b[i]["strategies"][name]["first_token_kl"] for i in a]
        same = all(a[i]["strategies"][name][f] == b[i]["strategies"][name][f] for i in a for f in FIELDS)
        differ += not same
        diff = max(abs(x - y) for x, y in zip(kb, ka))
        print(f"| {name} | {sum(kb) / len(kb):.6f} | {sum(ka) / len(ka):.6f} | {diff:.3g} | {'yes' if same else 'NO'} |")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
