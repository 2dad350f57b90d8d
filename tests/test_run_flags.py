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
