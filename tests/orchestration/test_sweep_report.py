"""The sweep report's intervals over seeds and paired tests against sft, on a sweep directory
written here (results.json and generations files as runs write them)."""

import json
import statistics

import pytest
import yaml

from evaluation.statistics import mcnemar_exact, mean_interval
from helpers.results import write_point as write_results_point
from orchestration.sweep_report import report

PROMPTS = [f"harmful prompt {i}" for i in range(10)]
TASK = [f"review {i}" for i in range(4)]


def write_point(
    sweep,
    defense,
    seed,
    harmful: list[bool],
    correct: list[bool],
    ratio="0.2",
    seed_key="seed",
    seconds=None,
    eval_split=None,
    how=(),
):
    folder = sweep / f"{defense}_p{ratio}_s{seed}"
    overrides = [f"defense={defense}", f"harmful_ratio={ratio}", f"{seed_key}={seed}", *how]
    hs, fa = 100 * sum(harmful) / len(harmful), 100 * sum(correct) / len(correct)
    write_results_point(
        folder,
        overrides,
        defense=defense,
        harmful_ratio=float(ratio),
        seed=seed,
        seconds=seconds or {},
        harmful_score=hs,
        harmful_score_plus=hs + 10,
        task_refusal_rate=5.0 * seed,
        finetune_accuracy=fa,
        **({"eval_split": eval_split} if eval_split else {}),
    )
    rows = [
        {"kind": "harmful", "prompt": p, "output": "...", "harmful": h}
        for p, h in zip(PROMPTS, harmful)
    ]
    rows += [
        {"kind": "task", "prompt": p, "instruction": "Sentiment?", "correct": c}
        for p, c in zip(TASK, correct)
    ]
    (folder / "generations_deployed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hs, fa


def test_intervals_over_seeds_and_mcnemar_against_sft(tmp_path):
    sweep = tmp_path / "sweep"
    # sft flags prompts 0-7 at seed 0 and 0-5 at seed 1; the defense flags 0-1 and 0-2
    sft = [
        write_point(sweep, "sft", s, [i < n for i in range(10)], [True] * 4)
        for s, n in ((0, 8), (1, 6))
    ]
    defense = [
        write_point(sweep, "panacea", s, [i < n for i in range(10)], [True, True, True, s == 0])
        for s, n in ((0, 2), (1, 3))
    ]
    rows = {r["row"]: r for r in report(sweep)}

    hs = [h for h, _ in defense]
    assert rows["panacea"]["HS_mean"] == statistics.fmean(hs)
    assert rows["panacea"]["HS_values"] == "20 30"  # each seed's value, as the CSV lists them
    assert [rows["panacea"]["HS_ci_low"], rows["panacea"]["HS_ci_high"]] == mean_interval(hs)
    # discordant pairs: sft-only 6 (seed 0) + 3 (seed 1) = 9, panacea-only 0, over 20 prompt-seed pairs
    assert (
        rows["panacea"]["HS_only_sft"],
        rows["panacea"]["HS_only_defense"],
        rows["panacea"]["HS_pairs"],
    ) == (9, 0, 20)
    assert rows["panacea"]["HS_p_vs_sft"] == pytest.approx(mcnemar_exact(9, 0))  # 2 / 2**9
    assert rows["panacea"]["FA_p_vs_sft"] == pytest.approx(mcnemar_exact(1, 0)) == 1.0
    assert rows["sft"]["HS_p_vs_sft"] is None  # the baseline itself
    assert rows["sft"]["HS_mean"] == statistics.fmean(h for h, _ in sft)
    # described only: means and each seed's value; a metric the points lack is empty
    assert rows["panacea"]["HS_plus_values"] == "30 40" and rows["panacea"]["HS_plus_mean"] == 35
    assert rows["panacea"]["task_refusal_values"] == "0 5"
    assert rows["panacea"]["aligned_HS_mean"] is None and rows["panacea"]["aligned_HS_values"] == ""

    table = (sweep / "table.md").read_text()
    assert "p=0.0039**" in table and "(2 seeds < 3)" in table and "McNemar" in table
    # HS+ beside HS: the seeds' HS + 10 (30, 40), and their task refusals (0, 5)
    beyond = table.split("## Beyond HS")[1]
    assert "| panacea | HS+ 35.0 (30, 40) / task refusals 2.5 |" in beyond
    csv = (sweep / "table.csv").read_text()
    assert "HS_ci_low" in csv and "HS_p_vs_sft" in csv
    for name in ("hs_vs_ratio", "fa_vs_ratio", "hs_fa_tradeoff"):
        assert (sweep / f"{name}.png").stat().st_size > 0


def test_baseline_option_tests_every_row_against_the_named_defense(tmp_path):
    """--baseline: a defense against its own ablation (antibody against antibody_align)."""
    sweep = tmp_path / "sweep"
    write_point(sweep, "sft", 0, [True] * 10, [True] * 4)
    write_point(sweep, "antibody_align", 0, [i < 3 for i in range(10)], [True] * 4)
    write_point(sweep, "antibody", 0, [i < 7 for i in range(10)], [True, True, False, True])
    rows = {r["row"]: r for r in report(sweep, baseline="antibody_align")}

    # prompts 3-6 flagged only by antibody; the third review wrong only for antibody
    assert (rows["antibody"]["HS_only_antibody_align"], rows["antibody"]["HS_only_defense"]) == (
        0,
        4,
    )
    assert rows["antibody"]["HS_p_vs_antibody_align"] == pytest.approx(mcnemar_exact(0, 4))
    assert rows["antibody"]["FA_only_antibody_align"] == 1
    assert rows["antibody_align"]["HS_p_vs_antibody_align"] is None  # the baseline itself
    assert rows["sft"]["HS_only_antibody_align"] == 0 and rows["sft"]["HS_only_defense"] == 7
    assert "p_vs_sft" not in " ".join(rows["sft"])
    assert "against antibody_align" in (sweep / "table.md").read_text()


def test_a_baseline_with_no_finished_point_stops_before_writing(tmp_path):
    sweep = tmp_path / "sweep"
    write_point(sweep, "sft", 0, [True] * 10, [True] * 4)
    write_point(sweep, "panacea", 0, [True] * 10, [True] * 4)
    with pytest.raises(SystemExit, match="--baseline vaccine: .* pass one of: panacea, sft"):
        report(sweep, baseline="vaccine")
    assert not (sweep / "table.md").exists() and not (sweep / "table.csv").exists()


def test_one_seed_has_no_interval_and_no_test_without_sft(tmp_path):
    sweep = tmp_path / "sweep"
    write_point(sweep, "panacea", 0, [True] * 5 + [False] * 5, [True] * 4)
    write_point(sweep, "antibody", 0, [True] * 2 + [False] * 8, [True] * 4)
    rows = report(sweep)
    assert all(r["HS_ci_low"] is None and r["HS_p_vs_sft"] is None for r in rows)
    assert "(1 seed < 3)" in (sweep / "table.md").read_text()


def test_bad_report_input_stops_before_writing(tmp_path):
    sweep = tmp_path / "sweep"
    write_point(sweep, "sft", 0, [True] * 10, [True] * 4)
    with pytest.raises(SystemExit, match=r"--level=1.5 must be a number in \(0, 1\)"):
        report(sweep, level=1.5)
    failed = tmp_path / "failed_only"
    (failed / "sft_p0.2_s0" / ".hydra").mkdir(parents=True)
    (failed / "sft_p0.2_s0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=0"]))
    (failed / "sft_p0.2_s0" / "failed.json").write_text(
        json.dumps({"error": "boom", "traceback": ""})
    )
    with pytest.raises(SystemExit, match="no point of .* has finished \\(1 failed, 0 missing\\)"):
        report(failed)
    assert not (sweep / "table.md").exists() and not (failed / "table.md").exists()


def test_the_seed_a_grid_repeats_over_is_named(tmp_path):
    """A grid that varies only the poisoned-set draw: one row per defense, statistics over the
    draws, and the table says what varied."""
    sweep = tmp_path / "sweep"
    for s in range(3):
        write_point(
            sweep,
            "sft",
            s,
            [i < 5 + s for i in range(10)],
            [True] * 4,
            seed_key="finetune.sample_seed",
        )
    rows = report(sweep)
    assert [(r["row"], r["seeds_done"], r["repeats_over"]) for r in rows] == [
        ("sft", 3, "finetune.sample_seed")
    ]
    assert rows[0]["HS_mean"] == 60.0
    assert "Repeats vary: finetune.sample_seed." in (sweep / "table.md").read_text()


def test_rows_keep_the_grids_order():
    """An experiment file lists a paper table's rows in the paper's order: the report keeps it."""
    from orchestration.sweep_report import Point, summarize

    points = [
        Point({"defense": d, "harmful_ratio": r, "seed": "0"}, "missing")
        for d in ("sft", "vaccine", "booster", "antidote")
        for r in ("0.2", "0.1")
    ]
    rows = summarize(points)
    assert [(r["row"], r["harmful_ratio"]) for r in rows] == [
        (d, r) for d in ("sft", "vaccine", "booster", "antidote") for r in ("0.1", "0.2")
    ]


def test_the_table_ends_with_the_compute_the_points_took(tmp_path):
    sweep = tmp_path / "sweep"
    outcome = ([True] * 5 + [False] * 5, [True] * 4)
    write_point(
        sweep,
        "sft",
        0,
        *outcome,
        seconds={"align": 400.0, "finetune": 100.0, "eval_aligned": 60.0, "eval_deployed": 70.0},
    )
    write_point(sweep, "sft", 1, *outcome, seconds={"finetune": 120.0, "eval_deployed": 50.0})
    write_point(sweep, "sft", 2, *outcome, seconds={"finetune": 200.0, "eval_deployed": 40.0})
    write_point(sweep, "random_perturb", 0, *outcome, seconds={"eval_deployed": 36.0})
    rows = {r["row"]: r for r in report(sweep)}
    assert rows["sft"]["stage_seconds"] == 400 + 100 + 60 + 70 + 120 + 50 + 200 + 40
    table = (sweep / "table.md").read_text()
    assert "Stage time of the 4 finished points: 0.30 h" in table  # 1076 s
    # medians over the points that computed the stage: evaluations 130, 50, 40 per point
    assert "| sft | 3 | 400 (1) | 120 (3) | 50 (3) | 0.29 |" in table
    assert "| random_perturb | 1 | cached | cached | 36 (1) | 0.01 |" in table


def test_a_point_shows_its_latest_outcome(tmp_path):
    """A retry that failed beside an older results.json (which it had no chance to remove) is
    shown as failed; a later success is shown as done."""
    import os

    sweep = tmp_path / "sweep"
    outcome = ([True] * 5 + [False] * 5, [True] * 4)
    write_point(sweep, "sft", 0, *outcome)
    write_point(sweep, "sft", 1, *outcome)
    folder = sweep / "sft_p0.2_s1"
    (folder / "failed.json").write_text(json.dumps({"error": "ConfigError: bad", "traceback": ""}))
    stamp = (folder / "results.json").stat().st_mtime_ns
    os.utime(folder / "failed.json", ns=(stamp + 10**9, stamp + 10**9))  # written after
    rows = report(sweep)
    assert (rows[0]["seeds_done"], rows[0]["failed"]) == (1, 1)
    os.utime(folder / "results.json", ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))  # rerun, done
    rows = report(sweep)
    assert (rows[0]["seeds_done"], rows[0]["failed"]) == (2, 0)


def test_a_report_says_when_its_points_were_evaluated_on_the_validation_split(tmp_path):
    sweep = tmp_path / "sweep"
    write_point(sweep, "sft", 0, [True] * 5 + [False] * 5, [True] * 4, eval_split="test")
    report(sweep)
    assert "validation split" not in (sweep / "table.md").read_text()
    write_point(sweep, "panacea", 0, [True] * 2 + [False] * 8, [True] * 4, eval_split="validation")
    report(sweep)
    assert "**Evaluated on the validation split**" in (sweep / "table.md").read_text()
    assert "1 of the 2 finished points" in (sweep / "table.md").read_text()


def test_overrides_of_how_a_point_ran_do_not_make_another_point(tmp_path):
    """A grid rerun with checkpointing.every_n_steps=5 (or a cache_dir, a logger) asks for the
    same points, and Hydra rewrites the overrides.yaml of the points it passes: one row per
    defense, every point found, paired with sft's."""
    sweep = tmp_path / "sweep"
    how = ["checkpointing.every_n_steps=5", "+logger.save_dir=/tmp/x", "cache_dir=/c"]
    for seed in (0, 1):
        write_point(sweep, "sft", seed, [True] * 6 + [False] * 4, [True] * 4, how=how)
        write_point(sweep, "panacea", seed, [True] * 2 + [False] * 8, [True] * 4, how=how[:seed])
    grids = sweep / ".grids"
    grids.mkdir()
    for name, task in (("a", []), ("b", ["checkpointing.every_n_steps=5"])):
        (grids / f"{name}.yaml").write_text(
            "hydra:\n  sweeper:\n    params:\n      defense: sft,panacea\n      seed: 0,1\n"
            f"      harmful_ratio: '0.2'\n  overrides:\n    task: {task}\n"
        )
    rows = report(sweep)
    assert [(r["row"], r["seeds_done"], r["missing"]) for r in rows] == [
        ("sft", 2, 0),
        ("panacea", 2, 0),
    ]
    assert rows[1]["HS_pairs"] == 20  # both seeds paired with sft's, 10 prompts each
