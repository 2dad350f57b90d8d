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
