"""`fftmoe run` refuses bad method options up front, with one specific line and exit code 2, before it
exports, partitions or starts anything."""

from __future__ import annotations

import pytest

from hw_profiles import run


@pytest.mark.parametrize("argv, words", [
    (["--router-lr", "2"], "--router-lr must be in [0, 1], got 2.0"),
    (["--server-lr", "0"], "--server-lr must be > 0, got 0.0"),
    (["--server-optimizer", "fedadam", "--router-lr", "0.5"], "--router-lr is a step of the fedavg server optimizer"),
    (["--serve-averaged-router"], "--serve-averaged-router goes with --personalise-router"),
    (["--method", "fedit", "--personalise-router"], "are FFT-MoE options"),
    (["--method", "hetlora", "--server-optimizer", "fedadam"], "are FFT-MoE options"),
    (["--slot-keep", "1.5"], "--slot-keep must be in [0, 1], got 1.5"),
    (["--method", "fedit", "--slot-keep", "0"], "are FFT-MoE options"),
    (["--logit-prior", "-1"], "--logit-prior must be in [0, 10], got -1.0"),
])
def test_bad_method_options_exit_2_before_any_work(argv, words, capsys, tmp_path):
    assert run.main(argv + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fftmoe run: error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, words", [
    (["--label-count-epsilon", "0"], "--label-count-epsilon must be a positive finite number, got 0.0"),
    (["--label-count-epsilon", "inf", "--head-weighting", "labels"], "must be a positive finite number, got inf"),
    (["--label-count-epsilon", "1"], "--label-count-epsilon goes with --head-weighting labels"),
    (["--recipe", "label-aware", "--head-weighting", "samples", "--label-count-epsilon", "1"],
     "goes with --head-weighting labels"),
    (["--recipe", "label-aware", "--server-optimizer", "fedadam"],
     "(the label-aware recipe sets it; give --router-lr 1 to override)"),
])
def test_bad_label_count_and_recipe_options_exit_2_before_any_work(argv, words, capsys, tmp_path):
    assert run.main(argv + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fftmoe run: error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_the_label_aware_recipe_sets_its_four_settings_and_explicit_flags_win():
    paper, aware = run.parse_args([]), run.parse_args(["--recipe", "label-aware"])
    setting = ("logit_prior", "own_labels_only", "head_weighting", "router_lr")
    assert [getattr(paper, k) for k in setting] == [0.0, False, "samples", 1.0]
    assert [getattr(aware, k) for k in setting] == [1.0, True, "labels", 0.0]
    assert run.parse_args(["--recipe", "label-aware", "--router-lr", "1"]).router_lr == 1.0
    assert run.parse_args(["--router-lr", "0.5", "--recipe", "label-aware"]).router_lr == 0.5  # order does not matter
    # the baselines take what applies to them (router_lr is FFT-MoE's), so the comparison stays like for like
    fedit = run.parse_args(["--recipe", "label-aware", "--method", "fedit"])
    assert [getattr(fedit, k) for k in setting] == [1.0, True, "labels", 1.0]


def test_an_unknown_recipe_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        run.parse_args(["--recipe", "fast"])
    assert exit_.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
