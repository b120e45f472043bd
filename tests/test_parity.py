"""Export parity: which exports a run folder holds, and the verdict against the tolerance."""
from __future__ import annotations

import argparse

import pytest

import evaluate
from howto import parity
from howto.runio import RunError


def test_run_folder_exports_are_its_gguf_files_else_its_merged_model(tmp_path):
    assert parity.find_exports(tmp_path) == []
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert parity.find_exports(tmp_path) == [("merged", tmp_path / "merged")]
    (tmp_path / "gguf").mkdir()
    for quant in ("q8_0", "q4_k_m"):
        (tmp_path / "gguf" / f"model-{quant}.gguf").write_bytes(b"GGUF")
    assert parity.find_exports(tmp_path) == [("gguf-q4_k_m", tmp_path / "gguf" / "model-q4_k_m.gguf"),
                                             ("gguf-q8_0", tmp_path / "gguf" / "model-q8_0.gguf")]
    assert parity.find_exports(tmp_path / "gguf" / "model-q8_0.gguf") == []


def comparison(delta, low, high, n=20):
    return {"delta": delta, "ci_low": low, "ci_high": high, "n": n}


@pytest.mark.parametrize("f1,order,expected", [
    (comparison(0.0, 0.0, 0.0), comparison(0.0, 0.0, 0.0), "same"),
    (comparison(-0.05, -0.08, -0.02), comparison(0.0, -0.01, 0.01), "worse"),    # a real, large drop
    (comparison(-0.05, -0.15, 0.05), comparison(0.0, -0.01, 0.01), "same"),     # not told apart from zero
    (comparison(-0.01, -0.015, -0.005), comparison(0.0, 0.0, 0.0), "same"),     # real but within the tolerance
    (comparison(0.04, 0.01, 0.07), comparison(0.0, 0.0, 0.0), "better"),
    (comparison(0.04, 0.01, 0.07), comparison(-0.1, -0.2, -0.03), "worse"),     # worse on one is worse
    (comparison(None, None, None, n=0), comparison(0.0, 0.0, 0.0), "same"),
    (comparison(-0.5, -0.5, -0.5, n=1), comparison(-0.5, -0.5, -0.5, n=1), "too few paired prompts"),
    (comparison(-0.05, -0.08, -0.02, n=5), comparison(0.0, -0.01, 0.01, n=5), "too few paired prompts"),
    (comparison(-0.05, -0.08, -0.02, n=6), comparison(0.0, -0.01, 0.01, n=2), "worse"),  # judged where it can be
])
def test_verdict_against_the_tolerance(f1, order, expected):
    assert parity.verdict({"bertscore_f1": f1, "order_accuracy": order}, tolerance=0.02) == expected


def test_identical_share_and_differences_pair_by_prompt():
    reference = {"a": {"output": "1. x\n2. y", "bertscore_f1": 0.9, "order_accuracy": 1.0, "looping": 0},
                 "b": {"output": "1. z", "bertscore_f1": 0.5, "order_accuracy": None, "looping": 0},
                 "c": {"output": "1. u\n2. v", "bertscore_f1": 0.8, "order_accuracy": 0.5, "looping": 0}}
    export = {"c": {"output": "1. u\n2. v ", "bertscore_f1": 0.8, "order_accuracy": 0.5, "looping": 0},
              "a": {"output": "1. x\n2. w", "bertscore_f1": 0.7, "order_accuracy": 1.0, "looping": 1}}
    result = parity.export_parity(reference, export, tolerance=0.02, n_resamples=100, seed=0)
    assert result["n_paired"] == 2 and result["identical"] == 1 and result["identical_share"] == 0.5
    assert result["bertscore_f1"]["delta"] == pytest.approx(-0.1) and result["order_accuracy"]["n"] == 2
    assert result["looping"]["delta"] == pytest.approx(0.5)


def test_fail_on_regression_makes_a_worse_export_an_error(tmp_path):
    metrics = {"parity": {"exports": {"gguf-q4_k_m": {"verdict": "worse"}, "gguf-q8_0": {"verdict": "same"}}}}
    args = argparse.Namespace(fail_on_regression=True, parity_tolerance=0.02, out=str(tmp_path))
    with pytest.raises(RunError, match="gguf-q4_k_m scored worse than the adapter"):
        evaluate.check_regression(metrics, args)
    evaluate.check_regression(metrics, argparse.Namespace(**{**vars(args), "fail_on_regression": False}))
    metrics["parity"]["exports"]["gguf-q4_k_m"]["verdict"] = "better"
    evaluate.check_regression(metrics, args)


def test_fail_on_regression_does_not_pass_an_export_judged_on_too_few_prompts(tmp_path):
    metrics = {"parity": {"exports": {"gguf-q8_0": {"verdict": "too few paired prompts"}}}}
    args = argparse.Namespace(fail_on_regression=True, parity_tolerance=0.02, out=str(tmp_path))
    with pytest.raises(RunError, match="gguf-q8_0: too few paired prompts \\(fewer than 6\\) to tell whether it is "
                                         "worse than the adapter"):
        evaluate.check_regression(metrics, args)
    evaluate.check_regression(metrics, argparse.Namespace(**{**vars(args), "fail_on_regression": False}))
