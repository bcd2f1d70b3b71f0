"""Mean ± 95% interval over seeds of figures already in `report.json` files, and paired differences.

For stages run once per seed outside `reproduce_readme.py` (e.g. a real-model preset's recovery
stage with `recovery.seed=S`): give one report per seed, the figures as dotted keys, and the pairs
to compare as `A-B`. Differences are paired by report (seed); an interval that includes zero is
flagged "no measurable difference here". A key `A|B` takes the first alternative a report has,
for reports of two shapes (the sft stage's `after.on.adherence`, bench_toggle.py's
`result.on.adherence`).

    python benchmarks/seed_table.py --reports /tmp/smolT/out/recovery/report.json \\
        /tmp/recS1/recovery/report.json /tmp/recS2/recovery/report.json \\
        --keys kd_gap_closed cpt_gap_closed kd.kl_div cpt.kl_div \\
        --diff kd_gap_closed-cpt_gap_closed --json benchmarks/results/smollm2_recovery_seeds.json

Instant: it only reads the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reproduce_readme import difference, interval

from nemo_plugins.utils.atomic import write_json_atomic


def _dig(report: dict, key: str):
    """(value at dotted `key`, None) or (None, the first missing part). A part that is a number
    indexes a list (`iterations.2.accuracy`)."""
    value = report
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None, part
    return value, None


def lookup(report: dict, key: str, where: str) -> float:
    """The number at dotted `key` in `report`, or SystemExit naming the file and the key. A key
    may name alternatives, `A|B`: the first one the report has (the sft stage's report says
    `after.on.adherence` where bench_toggle.py's JSON says `result.on.adherence`)."""
    for alt in key.split("|"):
        value, missing = _dig(report, alt)
        if missing is None:
            break
    else:
        raise SystemExit(f"{where}: no {key!r} (missing {missing!r})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SystemExit(f"{where}: {key}={value!r}: expected a number")
    return float(value)


def seed_table(reports: list[str], keys: list[str], diffs: list[str]) -> dict:
    """{"reports", "figures": {key: {"values", "interval"}}, "differences": {"A-B": text}}."""
    loaded = []
    for path in reports:
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: cannot read a JSON report ({e})") from e
    wanted = list(dict.fromkeys(keys + [k for d in diffs for k in _pair(d)]))
    values = {k: [lookup(r, k, p) for r, p in zip(loaded, reports)] for k in wanted}
    return {
        "reports": reports,
        "figures": {k: {"values": values[k], "interval": interval(values[k])} for k in keys},
        "differences": {d: difference(values[_pair(d)[0]], values[_pair(d)[1]]) for d in diffs},
    }


def _pair(spec: str) -> tuple[str, str]:
    a, sep, b = spec.partition("-")
    if not sep or not a or not b:
        raise SystemExit(f"--diff {spec!r}: expected KEY_A-KEY_B")
    return a, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", nargs="+", required=True, help="one report.json per seed")
    ap.add_argument("--keys", nargs="*", default=[], help="dotted keys of the figures")
    ap.add_argument("--diff", nargs="*", default=[], help="paired differences, KEY_A-KEY_B")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    table = seed_table(args.reports, args.keys, args.diff)
    print(f"{len(args.reports)} reports (seeds); mean ± 95% t-interval")
    for key, fig in table["figures"].items():
        print(f"  {key}: {fig['interval']}  (per seed: {', '.join(f'{v:.3f}' for v in fig['values'])})")
    for spec, text in table["differences"].items():
        print(f"  {spec}: {text}")
    if args.json:
        write_json_atomic(Path(args.json), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
