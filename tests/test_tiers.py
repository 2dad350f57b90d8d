"""The tiers file: the default ships and validates; every bad value is named with its key and file."""

from __future__ import annotations

import pytest

from export.tiers import TierConfigError, load_tiers, parse_tiers

GOOD = """
[global]
experts = 8
rank = 16
[tiers.a]
experts_held = 4
top_k = 2
adapted_layers = 2
seq_len = 64
batch_size = 8
"""


def test_default_tiers_go_from_small_to_large():
    spec = load_tiers()
    assert [t.name for t in spec.tiers] == ["nano", "small", "medium", "large"]
    held = [t.experts_held * t.adapted_layers for t in spec.tiers]
    assert held == sorted(held) and held[0] < held[-1]
    assert spec.global_layers == 6 and spec.experts == 8


@pytest.mark.parametrize("edit, message", [
    (("top_k = 2", "top_k = 5"), "top_k = 5 exceeds experts_held = 4"),
    (("experts_held = 4", "experts_held = 9"), "experts_held = 9 exceeds the global expert count 8"),
    (("seq_len = 64", "seq_len = 64\nsequence = 3"), "unknown key(s) ['sequence'] in [tiers.a]"),
    (("rank = 16", "rank = 16\nrnak = 2"), "unknown key(s) ['rnak'] in [global]"),
    (("batch_size = 8", "batch_size = 0"), "[tiers.a].batch_size = 0 must be an integer"),
    (("batch_size = 8", "batch_size = 8.5"), "batch_size = 8.5"),
    (("[tiers.a]", "[tiers.A]"), "tier name 'A'"),
    (("experts = 8", "experts = 8\n[other]"), "unknown top-level key(s) ['other']"),
])
def test_bad_tiers_name_the_key_and_file(edit, message):
    with pytest.raises(TierConfigError) as err:
        parse_tiers(GOOD.replace(*edit), "my/tiers.toml")
    assert message in str(err.value) and str(err.value).startswith("my/tiers.toml:")


def test_backbone_limits_are_checked():
    spec = parse_tiers(GOOD, "t.toml")
    spec.check_against(num_layers=2, max_positions=64)
    with pytest.raises(TierConfigError, match="seq_len 64 above the model's maximum of 32"):
        spec.check_against(num_layers=2, max_positions=32)
    with pytest.raises(TierConfigError, match="adapts 2 layers but the model has only 1"):
        spec.check_against(num_layers=1, max_positions=64)


def test_unreadable_file_and_bad_toml(tmp_path):
    with pytest.raises(TierConfigError, match="cannot read tiers file"):
        load_tiers(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[global\n")
    with pytest.raises(TierConfigError, match="bad.toml: not valid TOML"):
        load_tiers(bad)


SERVING = GOOD + """
[tiers.serve]
serving_only = true
experts_held = 8
top_k = 2
adapted_layers = 2
seq_len = 64
batch_size = 8
"""


def test_a_serving_only_tier_is_served_not_trained():
    spec = parse_tiers(SERVING, "t.toml")
    assert [t.name for t in spec.training_tiers] == ["a"]
    assert spec.tier("serve").serving_only and not spec.tier("a").serving_only
    assert [t.name for t in spec.without_serving_tier().tiers] == ["a"]  # what the LoRA baselines export


@pytest.mark.parametrize("edit, message", [
    (("serving_only = true", 'serving_only = "yes"'), "[tiers.serve].serving_only = 'yes' must be true or false"),
    (("batch_size = 8\n\n[tiers.serve]", "batch_size = 8\nserving_only = true\n\n[tiers.serve]"),
     "every tier is serving_only, so no device could train"),
    (("adapted_layers = 2\nseq_len = 64\nbatch_size = 8\n\n[tiers.serve]",
      "adapted_layers = 1\nseq_len = 64\nbatch_size = 8\n\n[tiers.serve]"),
     "[tiers.serve] is serving_only and adapts 2 layers, but no device tier adapts more than 1"),
])
def test_bad_serving_tiers_are_named(edit, message):
    text = SERVING.replace(*edit)
    assert text != SERVING
    with pytest.raises(TierConfigError) as err:
        parse_tiers(text, "my/tiers.toml")
    assert message in str(err.value) and str(err.value).startswith("my/tiers.toml:")


def test_two_serving_tiers_are_refused():
    text = SERVING + SERVING[SERVING.index("[tiers.serve]"):].replace("[tiers.serve]", "[tiers.serve2]")
    with pytest.raises(TierConfigError, match="tiers serve, serve2 are all serving_only; keep one"):
        parse_tiers(text, "t.toml")
