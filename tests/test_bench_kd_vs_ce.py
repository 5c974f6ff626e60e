"""bench/kd_vs_ce.py's pure functions: the Welch p-value, the compute-matched CE stage list, the curve plan, the
goals on a hand-made results dict, the table and the plot. Nothing is trained."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("kd_vs_ce")


@pytest.fixture(scope="module")
def seeds():
    return load("seed_stats")


# Welch's classic example (Wikipedia, "Welch's t-test", samples A1 and A2): t = -2.46, nu = 25.0, p = 0.021.
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_t_and_p_against_known_values(seeds):
    t, df = seeds.welch_t(A1, A2)
    assert t == pytest.approx(-2.46, abs=0.005)
    assert df == pytest.approx(24.99, abs=0.01)  # 24.98853 (scipy: the same); Wikipedia rounds it
    assert seeds.welch_p(A1, A2) == pytest.approx(0.021, abs=0.0005)
    assert seeds.welch_p(A2, A1) == seeds.welch_p(A1, A2)
    from scipy import stats
    a, b = [5.1, 4.9, 6.2, 5.7, 6.0], [3.9, 4.4, 5.0, 3.7, 4.1]
    assert seeds.welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    # a single reference value is a constant: the one-sample t-test
    assert seeds.welch_p(a, [5.0]) == pytest.approx(stats.ttest_1samp(a, 5.0).pvalue, rel=1e-9)
    assert seeds.welch_p([1.0], [2.0]) is None
    assert seeds.welch_p([1.0, 1.0], [1.0, 1.0]) is None  # nothing varies: nothing to test
    assert seeds.welch_p([1.0, 1.0], [2.0]) is None
    assert seeds.welch_p([1.0, 1.0], [1.0, 3.0]) == pytest.approx(stats.ttest_1samp([1.0, 3.0], 1.0).pvalue)


@pytest.mark.parametrize("t, df, p", [(2.0, 1.0, 0.1475836), (1.0, 5.0, 0.1816087), (2.776445, 4.0, 0.025),
                                      (0.0, 3.0, 0.5), (-1.0, 5.0, 0.8183913)])
def test_student_t_tail_known_values(seeds, t, df, p):
    assert seeds.student_t_sf(t, df) == pytest.approx(p, abs=1e-6)
    if t >= 0:  # the fallback without scipy: P(T > t) = I_x(df / 2, 1 / 2) / 2 with x = df / (df + t^2)
        assert 0.5 * seeds._betainc(df / 2, 0.5, df / (df + t * t)) == pytest.approx(p, abs=1e-6)


FULL = [  # configs/full.yaml's shape, as the config gives it
    {"name": "vision", "steps": 300, "losses": ["vision"], "trainable": ["vision", "heads"], "lr": 3e-3,
     "micro_batch_size": 32, "warmup_steps": 20},
    {"name": "contrastive", "steps": 40, "losses": ["vision", "contrastive"], "trainable": ["all"], "lr": None,
     "micro_batch_size": 32, "warmup_steps": 10},
    {"name": "joint", "steps": 90, "losses": ["language", "vision"], "trainable": ["all"], "lr": None,
     "micro_batch_size": None, "warmup_steps": None},
    {"name": "drafters", "steps": 30, "losses": ["drafter"], "trainable": ["mtp"], "lr": None,
     "micro_batch_size": 32, "warmup_steps": 5},
]


def test_ce_stages_keep_every_stage_and_swap_a_teacher_only_stage_for_contrastive(bench):
    ce = bench.ce_stages(FULL)
    assert [s["name"] for s in ce] == [s["name"] for s in FULL]
    for kd, c in zip(FULL, ce, strict=True):
        assert {k: v for k, v in c.items() if k not in ("losses", "trainable")} == \
            {k: v for k, v in kd.items() if k not in ("losses", "trainable")}  # steps, batches, lr, warm-up
    assert ce[0]["losses"] == ["contrastive"] and ce[0]["trainable"] == ["vision", "contrastive"]
    assert ce[1]["losses"] == ["contrastive"] and ce[1]["trainable"] == ["all"]
    assert ce[2]["losses"] == ["language"] and ce[3]["losses"] == ["drafter"] and ce[3]["trainable"] == ["mtp"]
    assert bench.ce_stages([]) == []  # the default single joint stage: language becomes CE, nothing to swap
    assert FULL[0]["losses"] == ["vision"]  # the input is not modified


def test_the_ce_stage_list_resolves_compute_matched_with_the_kd_one(bench):
    """Through the trainer's own stage resolution: the CE arms (baseline_ce.yaml + ce_stages) run the same
    stages, steps and batches as the KD arm, and train the vision tower in the same stages."""
    from distill.config import load_config
    kd = load_config(["configs/default.yaml", "configs/full.yaml"])
    kd_stages = bench.resolved_stages(kd)
    ce = load_config(["configs/default.yaml", "configs/full.yaml", "configs/baseline_ce.yaml",
                      {"train": {"stages": bench.ce_stages(bench.to_container(kd)["train"]["stages"])}}])
    ce_stages = bench.resolved_stages(ce)
    bench.check_compute_matched({"kd_corrected": kd_stages, "ce": ce_stages})
    assert ce_stages[0]["terms"] == ["contrastive"] and ce_stages[0]["parts"] == ["vision", "contrastive"]
    assert kd_stages[0]["parts"] == ["vision", "heads"]
    # the plain baseline overlay drops the vision stage: not compute-matched
    plain = bench.resolved_stages(load_config(["configs/default.yaml", "configs/full.yaml",
                                               "configs/baseline_ce.yaml"]))
    with pytest.raises(ValueError, match="not compute-matched"):
        bench.check_compute_matched({"kd_corrected": kd_stages, "ce": plain})


def test_curve_plan_lands_checkpoints_on_the_joint_steps(bench):
    stages, start = [], 0
    for s in FULL:
        terms = [t for t in s["losses"]]
        parts = ["mtp"] if s["trainable"] == ["mtp"] else ["vision", "decoder"]
        stages.append({"name": s["name"], "start": start, "steps": s["steps"], "terms": terms, "parts": parts})
        start += s["steps"]
    plan = bench.curve_plan(stages, 3)
    assert plan["stage"] == "joint" and plan["steps"] == [30, 60, 90] and plan["global_steps"] == [370, 400, 430]
    assert plan["checkpoint_every"] == 30
    assert plan["keep_checkpoints"] == 3 + 1  # the drafter stage's one checkpoint (its step 30) comes after
    assert plan["final_is_last"]
    odd = bench.curve_plan([{**stages[2], "start": 0, "steps": 10}, {**stages[3], "start": 10, "steps": 7}], 3)
    assert odd["steps"] == [4, 8, 10] and odd["keep_checkpoints"] == 3 + 2  # drafters: step 4 and its end 7
    assert not bench.curve_plan(stages[:3] + [{**stages[3], "parts": ["decoder"]}], 3)["final_is_last"]
    with pytest.raises(ValueError, match="curve stage"):
        bench.curve_plan(stages, 3, "nope")


def s(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {"mean": mean, "std": std, "values": values}


def hand_made():
    arms = {
        "kd_corrected": {"eval/perplexity": s([3.0, 3.1, 2.9, 3.05, 2.95]),
                         "eval/teacher_perplexity": s([3.5] * 5),
                         "eval/grounded_acc": s([0.30, 0.31, 0.29, 0.30, 0.30]),
                         "eval/agreement/main": s([0.60, 0.61, 0.62, 0.60, 0.61]),
                         "eval/kl/main": s([0.50, 0.52, 0.49, 0.51, 0.50]),
                         "eval/probe/student": s([0.80, 0.81, 0.79, 0.80, 0.80])},
        "kd_uncorrected": {"eval/agreement/main": s([0.40, 0.41, 0.39, 0.40, 0.42]),
                           "eval/kl/main": s([0.70, 0.72, 0.69, 0.71, 0.70])},
        "kd_uncorrected vs corrected": {"eval/agreement/main": s([0.55, 0.56, 0.54, 0.55, 0.57]),
                                        "eval/kl/main": s([0.60, 0.61, 0.59, 0.62, 0.60])},
        "ce": {"eval/perplexity": s([4.0, 4.2, 3.8, 4.1, 3.9]),
               "eval/grounded_acc": s([0.32, 0.28, 0.33, 0.30, 0.31]),
               "eval/probe/student": s([0.50, 0.52, 0.51, 0.49, 0.50])},
        "ce_ls": {"eval/perplexity": s([3.1, 2.9, 3.2, 3.0, 2.8])},
    }
    return {"arms": arms, "references": {"eval/probe/pixels": 0.67, "eval/probe/effnet": 0.85}}


def test_goals_on_a_hand_made_result(bench):
    g = bench.goals(hand_made())
    assert g["perplexity_beats_ce"]["reached"] and g["perplexity_beats_ce"]["p_value"] < 1e-4
    assert g["perplexity_beats_ce"]["kd_corrected"] == pytest.approx(3.0)
    # against the smoothing control the difference is noise: not reached, p far above 0.05
    assert not g["perplexity_beats_ce_ls"]["reached"] and g["perplexity_beats_ce_ls"]["p_value"] > 0.5
    assert g["grounded_acc_no_worse_than_ce"]["reached"]
    assert g["teacher_ppl_at_most_ce_ppl"]["reached"]  # 3.5 against 4.0
    assert g["teacher_ppl_at_most_1.2x_trigram"]["reached"] is None  # no trigram figure: not measured
    agree = g["agreement_corrected_beats_uncorrected"]
    assert agree["reached"] and agree["kd_uncorrected vs corrected"] == pytest.approx(0.554)
    assert agree["kd_uncorrected_own_teacher"] == pytest.approx(0.404)
    assert g["kl_corrected_beats_uncorrected"]["reached"]
    assert g["probe_beats_ce_by_2std"]["reached"]
    probe = g["probe_at_least_0.9x_teacher"]
    assert probe["ratio"] == pytest.approx(0.8 / 0.85) and probe["reached"]
    # a trigram figure from the evaluator fills the teacher goal; missing arms leave goals not measured
    result = hand_made()
    result["references"]["eval/trigram_perplexity"] = 2.5
    trigram = bench.goals(result)["teacher_ppl_at_most_1.2x_trigram"]
    assert trigram["ratio"] == pytest.approx(1.4) and trigram["reached"] is False
    assert trigram["p_value"] is None  # the teacher's figure is the same in every seed, the trigram one number
    del result["arms"]["ce_ls"], result["arms"]["kd_uncorrected vs corrected"]
    g = bench.goals(result)
    assert g["perplexity_beats_ce_ls"]["reached"] is None and g["agreement_corrected_beats_uncorrected"]["p_value"] \
        is None


def test_table_and_plot_of_a_results_file(bench, tmp_path):
    result = hand_made()
    result["train_seconds"] = {"kd_corrected": s([370.0, 380.0])}
    result["language_weight"] = {"kd_corrected": s([0.8, 0.9])}
    curve = {"stage": "joint", "steps": [30, 60, 90], "global_steps": [370, 400, 430],
             "eval/perplexity": {"mean": [9.0, 5.0, 3.0], "std": [1.0, 0.5, 0.1], "values": [[8, 10], [5, 5], [3, 3]]},
             "eval/agreement/main": {"mean": [0.3, 0.5, 0.6], "std": [0.1, 0.05, 0.01],
                                     "values": [[0.2, 0.4], [0.5, 0.5], [0.6, 0.6]]}}
    result["curves"] = {"kd_corrected": curve, "ce": {**curve, "eval/agreement/main": curve["eval/agreement/main"]}}
    result["goals"] = bench.goals(result)
    text = bench.table(result)
    assert "| eval/perplexity | 3.0000 ± 0.0791 |" in text
    assert "| perplexity_beats_ce | **yes** |" in text and "not measured" in text
    assert "| 30 | 9.000 ± 1.000 | 0.300 ± 0.100 |" in text
    path = bench.plot(result, tmp_path / "curves.png")
    assert path.stat().st_size > 1000
    assert not math.isnan(result["goals"]["perplexity_beats_ce"]["p_value"])


@pytest.mark.slow
def test_a_checkpoint_becomes_the_student_the_trainer_exported(bench, train_cfg, tmp_path):
    """`checkpoint_student` at the curve stage's last step gives the weights of that stage's export: the curve
    points between are read the same way."""
    import torch
    from safetensors.torch import load_file

    from distill.train import run_training
    stages = ("train.stages=[{name: joint, steps: 4, losses: [language, vision]}, "
              "{name: drafters, steps: 2, losses: [drafter], trainable: [mtp]}]")
    cfg = train_cfg("train.max_steps=null", stages, "train.checkpoint_every=2", "train.keep_checkpoints=3")
    summary = run_training(cfg)
    plan = bench.curve_plan(bench.resolved_stages(cfg), 2)
    assert plan["global_steps"] == [2, 4] and plan["keep_checkpoints"] == 3 and plan["final_is_last"]
    export = Path(cfg.output_dir) / "stages" / "joint"
    points = [bench.checkpoint_student(Path(cfg.output_dir) / "checkpoints", step, export, tmp_path / f"at-{step}",
                                       cfg.train.zero_stage) for step in plan["global_steps"]]
    want, got = load_file(export / "model.safetensors"), load_file(points[1] / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    earlier = load_file(points[0] / "model.safetensors")
    assert any(not torch.equal(want[k], earlier[k]) for k in want)  # step 2 is another student
    final = load_file(Path(summary["student_dir"]) / "model.safetensors")  # the drafters moved only the MTP modules
    assert all(torch.equal(want[k], final[k]) for k in want if not k.startswith(("mtp.", "image_token_embedding")))
    assert (points[0] / "tokenizer.json").exists() or any(points[0].glob("tokenizer*"))
