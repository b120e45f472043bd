"""Every metric on hand-made cases whose right answer is known, the parser on messy outputs, the paired statistics,
and BERTScore cross-checked against bert_score.score called directly."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau

from howto.chat import parse_steps
from howto.metrics import (BertScore, BertScoreUnavailable, StepEncoder, align_steps, format_valid, join_steps,
                           mean_defined, minilm_dir, order_metrics, paired_comparison, pairwise_order_agreement,
                           score_examples)

STEPS = ["Open the app", "Go to the login page", "Tap 'Forgot Password'", "Enter your email address",
         "Tap 'Submit'"]


def same_text(generated, reference) -> np.ndarray:
    """A deterministic stand-in for the encoder: two steps are the same step when their text is (case aside)."""
    return np.array([[float(g.lower() == r.lower()) for r in reference] for g in generated]).reshape(
        len(generated), len(reference))


def orders(generated, reference=STEPS, threshold=0.5):
    return order_metrics(generated, reference, same_text(generated, reference), threshold)


# ---------------------------------------------------------------------------------------------------------------------
# Step-order accuracy, coverage, exact order
# ---------------------------------------------------------------------------------------------------------------------

def test_right_steps_in_right_order_score_one():
    m = orders([s.upper() for s in STEPS])
    assert m["order_accuracy"] == 1.0
    assert m["step_coverage"] == 1.0
    assert m["exact_order"] == 1
    assert m["alignment"] == [(i, i) for i in range(5)]


def test_reversed_steps_score_zero():
    m = orders(STEPS[::-1])
    assert m["order_accuracy"] == 0.0
    assert m["step_coverage"] == 1.0
    assert m["exact_order"] == 0


def test_one_adjacent_swap_costs_one_pair_of_ten():
    swapped = [STEPS[0], STEPS[2], STEPS[1], STEPS[3], STEPS[4]]
    m = orders(swapped)
    assert m["order_accuracy"] == pytest.approx(0.9)
    tau = kendalltau([0, 1, 2, 3, 4], [0, 2, 1, 3, 4]).statistic
    assert m["order_accuracy"] == pytest.approx((tau + 1) / 2)
    assert m["exact_order"] == 0


@pytest.mark.parametrize("ref_pos,gen_pos", [([0, 1, 2, 3, 4, 5], [5, 0, 3, 1, 4, 2]), ([2, 7, 9], [1, 0, 2])])
def test_order_agreement_is_kendall_tau_rescaled(ref_pos, gen_pos):
    tau = kendalltau(ref_pos, gen_pos).statistic
    assert pairwise_order_agreement(ref_pos, gen_pos) == pytest.approx((tau + 1) / 2)


def test_fewer_than_two_aligned_steps_leave_order_undefined():
    one = orders(["Open the app", "Dance a little", "Sing"])
    assert one["order_accuracy"] is None
    assert one["step_coverage"] == pytest.approx(1 / 5)
    assert one["exact_order"] == 0
    none = orders(["Call support"])
    assert none["order_accuracy"] is None and none["step_coverage"] == 0.0 and none["n_aligned"] == 0
    empty = order_metrics([], STEPS, np.zeros((0, 5)))
    assert empty["order_accuracy"] is None and empty["step_coverage"] == 0.0 and empty["exact_order"] == 0
    single = orders(["Open the app"], reference=["Open the app"])
    assert single["order_accuracy"] is None and single["exact_order"] == 1  # nothing missed, nothing out of order


def test_undefined_order_accuracy_is_left_out_of_means():
    assert mean_defined([1.0, None, 0.0, float("nan")]) == (0.5, 2)
    assert mean_defined([None, None]) == (None, 0)


def test_missing_and_extra_steps_change_coverage_not_order():
    generated = ["Say hello", STEPS[0], STEPS[1], "Restart the phone", STEPS[4]]
    m = orders(generated)
    assert m["step_coverage"] == pytest.approx(3 / 5)
    assert m["order_accuracy"] == 1.0
    assert m["exact_order"] == 0
    assert m["alignment"] == [(1, 0), (2, 1), (4, 4)]


def test_extra_steps_do_not_break_exact_order():
    m = orders([STEPS[0], "Wait a moment", *STEPS[1:]])
    assert m["step_coverage"] == 1.0 and m["order_accuracy"] == 1.0 and m["exact_order"] == 1


def test_alignment_is_one_to_one_and_respects_the_threshold():
    generated = ["Open the app", "Open the app"]  # the same step twice aligns once
    assert orders(generated)["n_aligned"] == 1
    sim = np.array([[0.9, 0.6], [0.45, 0.0]])
    # On raw similarities the best total (0.6 + 0.45) would drop the 0.9 pair for two weak ones, one below the bar.
    assert align_steps(sim, 0.5) == [(0, 0)]
    assert align_steps(np.array([[0.49]]), 0.5) == []
    assert align_steps(np.array([[0.5]]), 0.5) == [(0, 0)]


# ---------------------------------------------------------------------------------------------------------------------
# Format validity and the parser on messy outputs
# ---------------------------------------------------------------------------------------------------------------------

EXPECTED = ["Open the app", "Tap 'Settings'", "Tap 'Log out'"]


@pytest.mark.parametrize("output", [
    "1. Open the app\n2. Tap 'Settings'\n3. Tap 'Log out'",
    "1) Open the app\n2) Tap 'Settings'\n3) Tap 'Log out'",
    "- Open the app\n- Tap 'Settings'\n- Tap 'Log out'",
    "* Open the app\n* Tap 'Settings'\n* Tap 'Log out'",
    "Step 1: Open the app\nStep 2: Tap 'Settings'\nStep 3: Tap 'Log out'",
    '["Open the app", "Tap \'Settings\'", "Tap \'Log out\'"]',
    "Sure! Here are the steps:\n\n1. Open the app\n2. Tap 'Settings'\n3. Tap 'Log out'\n\nLet me know if that helps!",
    "Here is the answer:\n```json\n[\"Open the app\", \"Tap 'Settings'\", \"Tap 'Log out'\"]\n```",
])
def test_messy_outputs_parse_into_the_same_steps(output):
    steps = parse_steps(output)
    assert steps == EXPECTED
    assert format_valid(steps) == 1


@pytest.mark.parametrize("output", ["", "I'm sorry, I can't help with that.", "1. Open the app"])
def test_outputs_without_a_list_of_steps_are_invalid(output):
    assert format_valid(parse_steps(output)) == 0


# ---------------------------------------------------------------------------------------------------------------------
# The real encoder on paraphrases
# ---------------------------------------------------------------------------------------------------------------------

REFERENCE = ["Open the app", "Tap on the 'Forgot Password' link", "Enter your registered email address",
             "Tap 'Submit' to request a reset link", "Follow the link in the email to set a new password"]
PARAPHRASED = ["Launch the application", "Select 'Forgot Password'", "Type the email address linked to your account",
               "Press Submit to get a reset link", "Click the link you were emailed and choose a new password"]


@pytest.fixture(scope="module")
def encoder() -> StepEncoder:
    return StepEncoder("minilm")


def test_minilm_orders_paraphrases_like_the_reference(encoder):
    same = order_metrics(PARAPHRASED, REFERENCE, encoder(PARAPHRASED, REFERENCE))
    assert same["alignment"] == [(i, i) for i in range(5)]
    assert same["order_accuracy"] == 1.0 and same["step_coverage"] == 1.0 and same["exact_order"] == 1
    reversed_ = order_metrics(PARAPHRASED[::-1], REFERENCE, encoder(PARAPHRASED[::-1], REFERENCE))
    assert reversed_["order_accuracy"] == 0.0 and reversed_["step_coverage"] == 1.0
    unrelated = ["Preheat the oven to 200 degrees", "Water the plants on the balcony"]
    assert order_metrics(unrelated, REFERENCE, encoder(unrelated, REFERENCE))["n_aligned"] == 0


def test_step_similarity_is_cosine_of_unit_embeddings(encoder):
    vectors = encoder.embed(["Open the app", "Launch the application"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sim = encoder(["Open the app"], ["Open the app", "Launch the application", "Water the plants"])
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 1] > 0.5 > sim[0, 2]


# ---------------------------------------------------------------------------------------------------------------------
# BERTScore
# ---------------------------------------------------------------------------------------------------------------------

PAIRS = [
    (["Open the app", "Tap 'Settings'", "Tap 'Log out'"], ["Open the app", "Go to Settings", "Tap 'Log out'"]),
    (["Launch the application", "Select your profile"], ["Open the app", "Tap your profile picture", "Tap 'Edit'"]),
    (["Water the plants"], ["Open the banking app", "Tap 'Cards'", "Tap 'Freeze card'"]),
]


@pytest.fixture(scope="module")
def minilm_bertscore() -> BertScore:
    return BertScore("minilm", 6)


def test_bertscore_equals_bert_score_called_directly(minilm_bertscore):
    import bert_score

    cands = [join_steps(g) for g, _ in PAIRS]
    refs = [join_steps(r) for _, r in PAIRS]
    ours = minilm_bertscore.score(cands, refs)
    direct = bert_score.score(cands, refs, model_type=str(minilm_dir()), num_layers=6)
    for mine, theirs in zip(ours, direct, strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-6)
    assert not np.isnan(ours[2]).any()
    assert ours[2][0] > ours[2][2]  # a close answer beats an unrelated one
    assert minilm_bertscore.settings["num_layers"] == 6 and not minilm_bertscore.settings["rescale_with_baseline"]


def test_reference_settings_load_or_say_how_to_work_offline():
    try:
        scorer = BertScore()
    except BertScoreUnavailable as e:  # no hub and no cached roberta-large
        assert "--bertscore-model" in str(e) and "--bertscore-layers" in str(e) and "minilm" in str(e)
    else:
        assert scorer.settings["model"] == "roberta-large" and scorer.settings["num_layers"] == 17
        assert scorer.settings["rescale_with_baseline"]


def test_score_examples_fills_every_metric(minilm_bertscore):
    generated = [STEPS, STEPS[::-1], ["Open the app"], []]
    rows = score_examples(generated, [STEPS] * 4, minilm_bertscore, same_text)
    assert [r["order_accuracy"] for r in rows] == [1.0, 0.0, None, None]
    assert [r["step_coverage"] for r in rows] == [1.0, 1.0, 0.2, 0.0]
    assert [r["exact_order"] for r in rows] == [1, 0, 0, 0]
    assert [r["format_valid"] for r in rows] == [1, 1, 0, 0]
    assert [r["step_count_error"] for r in rows] == [0, 0, 4, 5]
    assert rows[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["bertscore_f1"] > rows[2]["bertscore_f1"]
    assert rows[3]["bertscore_f1"] == 0.0  # bert-score scores an empty candidate 0


# ---------------------------------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------------------------------

def test_bootstrap_ci_contains_the_true_difference_and_wilcoxon_sees_a_clear_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(0.6, 0.1, size=200)
    b = a + 0.05 + rng.normal(0, 0.05, size=200)
    result = paired_comparison(a, b, n_resamples=2000, seed=0)
    assert result["n"] == 200
    assert result["delta"] == pytest.approx(float(np.mean(b - a)))
    assert result["ci_low"] < result["delta"] < result["ci_high"]
    assert result["ci_low"] < 0.05 < result["ci_high"]
    assert result["ci_high"] - result["ci_low"] < 0.03
    assert result["p_value"] < 1e-10
    assert paired_comparison(a, b, n_resamples=2000, seed=0) == result  # seeded


def test_no_shift_gives_a_large_p_and_a_ci_around_zero():
    rng = np.random.default_rng(2)
    a = rng.normal(0.6, 0.1, size=100)
    b = a + rng.normal(0, 0.05, size=100)
    result = paired_comparison(a, b, seed=0)
    assert result["ci_low"] < 0 < result["ci_high"]
    assert result["p_value"] > 0.05


def test_all_zero_differences_give_p_one():
    result = paired_comparison([0.5, 0.7, 1.0], [0.5, 0.7, 1.0])
    assert result["delta"] == 0.0 and result["ci_low"] == 0.0 and result["ci_high"] == 0.0
    assert result["p_value"] == 1.0


def test_undefined_values_drop_their_pair():
    result = paired_comparison([1.0, None, 0.0, 0.5], [1.0, 1.0, None, 1.0])
    assert result["n"] == 2
    assert result["delta"] == pytest.approx(0.25)
    assert paired_comparison([None], [1.0])["delta"] is None
    with pytest.raises(ValueError, match="length"):
        paired_comparison([1.0], [1.0, 2.0])
