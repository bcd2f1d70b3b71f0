"""benchmarks/seed_table.py: intervals over per-seed report.json files and paired differences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_plugins.utils.stats import mean_interval

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "seed_table.py"


def _reports(tmp_path, rows):
    paths = []
    for i, (kd, lm) in enumerate(rows):
        p = tmp_path / f"seed{i}" / "report.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"kd_gap_closed": kd, "cpt_gap_closed": lm, "kd": {"kl_div": 1.0 - kd}}))
        paths.append(str(p))
    return paths


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def seed_table(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return load_benchmark("seed_table")


def test_intervals_and_paired_differences(tmp_path):
    reports = _reports(tmp_path, [(0.52, 0.28), (0.53, 0.28), (0.50, 0.30)])
    out = tmp_path / "table.json"
    done = _run("--reports", *reports, "--keys", "kd_gap_closed", "kd.kl_div", "--diff", "kd_gap_closed-cpt_gap_closed",
                "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    mean, half = mean_interval([0.52, 0.53, 0.50])
    assert table["figures"]["kd_gap_closed"]["interval"] == f"{mean:.3f} ± {half:.3f}"
    assert table["figures"]["kd.kl_div"]["values"] == pytest.approx([0.48, 0.47, 0.50])
    d_mean, d_half = mean_interval([0.24, 0.25, 0.20])
    assert table["differences"]["kd_gap_closed-cpt_gap_closed"] == f"{d_mean:+.3f} ± {d_half:.3f}"
    assert "kd_gap_closed" in done.stdout


def test_a_difference_within_noise_is_flagged(tmp_path, seed_table):
    reports = _reports(tmp_path, [(0.30, 0.28), (0.27, 0.30), (0.29, 0.29)])
    table = seed_table.seed_table(reports, [], ["kd_gap_closed-cpt_gap_closed"])
    assert "no measurable difference here" in table["differences"]["kd_gap_closed-cpt_gap_closed"]


def test_bad_input_names_the_file_and_key(tmp_path, seed_table):
    reports = _reports(tmp_path, [(0.5, 0.2)])
    with pytest.raises(SystemExit, match=f"{reports[0]}: no 'kd.lm_loss'"):
        seed_table.seed_table(reports, ["kd.lm_loss"], [])
    with pytest.raises(SystemExit, match="KEY_A-KEY_B"):
        seed_table.seed_table(reports, [], ["kd_gap_closed"])
    with pytest.raises(SystemExit, match="missing.json"):
        seed_table.seed_table([str(tmp_path / "missing.json")], ["kd_gap_closed"], [])


def test_a_key_with_alternatives_reads_reports_of_two_shapes(tmp_path, seed_table):
    """`A|B`: the first alternative each report has, so the sft stage's reports and
    bench_toggle.py's JSON (the same figure under another path) make one table; a report with
    neither is refused naming the whole key."""
    stage, bench, neither = (tmp_path / f"{n}.json" for n in ("stage", "bench", "neither"))
    stage.write_text(json.dumps({"after": {"off": {"adherence": 1.0}}}))
    bench.write_text(json.dumps({"result": {"off": {"adherence": 0.9}}, "after": {"on": {"adherence": 0.5}}}))
    neither.write_text(json.dumps({"before": {}}))
    key = "after.off.adherence|result.off.adherence"
    table = seed_table.seed_table([str(stage), str(bench)], [key], [])
    assert table["figures"][key]["values"] == [1.0, 0.9]
    with pytest.raises(SystemExit, match=r"neither.json: no 'after.off.adherence\|result.off.adherence'"):
        seed_table.seed_table([str(stage), str(neither)], [key], [])


def test_a_number_in_a_key_indexes_a_list(tmp_path, seed_table):
    """rpo's report keeps its rounds in a list: `iterations.2.accuracy` is round 2's accuracy;
    an index past the end is refused naming it."""
    paths = []
    for i, accs in enumerate([(0.5, 0.52, 0.49), (0.5, 0.51, 0.53)]):
        paths.append(tmp_path / f"rpo{i}.json")
        paths[-1].write_text(json.dumps({"iterations": [{"accuracy": a} for a in accs]}))
    table = seed_table.seed_table([str(p) for p in paths], ["iterations.2.accuracy"], ["iterations.2.accuracy-iterations.0.accuracy"])
    assert table["figures"]["iterations.2.accuracy"]["values"] == [0.49, 0.53]
    assert table["differences"]["iterations.2.accuracy-iterations.0.accuracy"].startswith("+0.010 ± ")
    with pytest.raises(SystemExit, match=r"rpo0.json: no 'iterations.3.accuracy' \(missing '3'\)"):
        seed_table.seed_table([str(paths[0])], ["iterations.3.accuracy"], [])


@pytest.mark.parametrize("table", sorted((ROOT / "benchmarks" / "results").glob("smollm2_*_seeds.json")), ids=lambda p: p.name)
def test_the_readme_quotes_each_committed_seed_table_verbatim(table):
    """Every interval and paired difference of a committed seed table (as seed_table.py wrote it)
    is in the README, beside the table's file name: the README's spreads cannot drift from them."""
    readme = (ROOT / "README.md").read_text()
    saved = json.loads(table.read_text())
    assert f"benchmarks/results/{table.name}" in readme
    quoted = [f["interval"] for f in saved["figures"].values()] + [d.split(" (")[0] for d in saved["differences"].values()]
    missing = [q for q in quoted if q not in readme]
    assert not missing, f"{table.name}: the README does not quote {missing}"
