"""The on-device trainer on a real exported tier: rounds, slots, optimiser reset, evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.local_data import LocalDataset, TextEncoder
from edge_runtime.trainer import HEAD_BIAS, HEAD_WEIGHT, LossInputs, TierTrainer, TrainerError, label_log_prior, take_steps
from tests.tiny_model import write_tiny_dataset

TIER = "big"


@pytest.fixture()
def trainer(tiny_export):
    return TierTrainer(tiny_export.root, TIER, threads=1)


@pytest.fixture()
def dataset(tiny_export, tmp_path):
    encoder = TextEncoder(tiny_export.root / TIER / "tokenizer.json", tiny_export.tier(TIER).seq_len)
    return LocalDataset(write_tiny_dataset(tmp_path / "data.csv", rows=80), labels=tiny_export.labels,
                        encoder=encoder, holdout_fraction=0.25, seed=0)


def _global_slots(trainer, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in trainer.param_shapes.items()}


def _uniform(trainer):
    tier = trainer.tier
    return LossInputs(0.01, 0.01, np.full((len(tier.adapted_layers), tier.experts_held), 1 / tier.experts_held))


def _round(trainer, dataset, arrays, steps=12, seed=0, **kw):
    rng = np.random.default_rng(seed)
    batches = take_steps(lambda: dataset.batches(trainer.tier.batch_size, rng), steps)
    return trainer.train_round(arrays, batches, _uniform(trainer), learning_rate=5e-3, **kw)


def test_round_trains_from_the_given_arrays(trainer, dataset):
    start = _global_slots(trainer)
    result = _round(trainer, dataset, start)
    assert result.steps == 12 and result.num_samples == 12 * trainer.tier.batch_size
    assert set(result.params) == set(start)
    for name, value in result.params.items():
        assert value.shape == start[name].shape and not np.array_equal(value, start[name]), name
    tier = trainer.tier
    assert result.expert_tokens.shape == (len(tier.adapted_layers), tier.experts_held)
    assert result.expert_tokens.sum() > 0 and np.isfinite(result.loss) and result.cpu_seconds > 0


def test_loss_falls_over_rounds_on_learnable_data(trainer, dataset):
    arrays = _global_slots(trainer)
    first = _round(trainer, dataset, arrays, steps=20)
    later = first
    for r in range(3):
        later = _round(trainer, dataset, later.params, steps=20, seed=r + 1)
    assert later.loss < first.loss
    loss, accuracy, seen = trainer.evaluate(dataset.holdout_batches(8))
    assert seen == dataset.holdout_size and 0.0 <= accuracy <= 1.0 and np.isfinite(loss)


def test_optimizer_reset_makes_rounds_reproducible(trainer, dataset):
    arrays = _global_slots(trainer)
    a = _round(trainer, dataset, arrays, seed=5)
    b = _round(trainer, dataset, arrays, seed=5)  # reset: fresh AdamW moments, same start, same batches
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    c = _round(trainer, dataset, arrays, seed=5, reset_optimizer=False)  # carries moments over
    assert any(not np.array_equal(a.params[n], c.params[n]) for n in a.params)


def test_stop_between_steps(trainer, dataset):
    calls = []
    result = _round(trainer, dataset, _global_slots(trainer), steps=10,
                    should_stop=lambda: len(calls) >= 3, on_step=lambda s, loss: calls.append(s))
    assert result.steps == 3 and result.metrics["stopped"] == 1.0


def test_wrong_arrays_are_refused(trainer):
    arrays = _global_slots(trainer)
    name = next(iter(arrays))
    with pytest.raises(TrainerError, match="shape"):
        trainer.set_params({name: np.zeros((1, 2), np.float32)})
    with pytest.raises(TrainerError, match="no trainable array"):
        trainer.set_params({"backbone.embeddings.word_embeddings.weight": np.zeros((3,), np.float32)})


def test_a_label_prior_shapes_the_loss_but_never_leaves_the_device(trainer, tiny_export, tmp_path):
    """Balanced softmax (`--logit-prior`): a device holding only one label trains with its prior in the
    logits, so that label's loss is low from the start; the update's head bias is the bias without
    the prior, while the device's own evaluation keeps it (its local predictions)."""
    encoder = TextEncoder(tiny_export.root / TIER / "tokenizer.json", tiny_export.tier(TIER).seq_len)
    one = LocalDataset(write_tiny_dataset(tmp_path / "one.csv", rows=40, labels=tiny_export.labels[:1]),
                       labels=tiny_export.labels, encoder=encoder, holdout_fraction=0.25, seed=0)
    counts = list(one.label_counts("train").values())
    prior = label_log_prior(counts, 1.0)
    assert label_log_prior(counts, 0.0) is None and prior.argmax() == 0 and np.isfinite(prior).all()
    assert prior[1:].max() < prior[0] - 3  # a lacking label: log(1 / (n + C)), not -inf
    start = _global_slots(trainer)
    tier = trainer.tier
    target = np.full((len(tier.adapted_layers), tier.experts_held), 1 / tier.experts_held)

    def train(p, lr=1e-9):
        batches = take_steps(lambda: one.batches(tier.batch_size, np.random.default_rng(0)), 4)
        return trainer.train_round(start, batches, LossInputs(0.0, 0.0, target, p), learning_rate=lr)

    plain, balanced = train(None), train(prior)
    assert balanced.loss < 0.2 * plain.loss  # the prior already favours the one label it holds
    np.testing.assert_allclose(balanced.params[HEAD_BIAS], start[HEAD_BIAS], atol=1e-5)  # prior taken off
    own_loss, own_accuracy, _ = trainer.evaluate(one.holdout_batches(8))  # the module still has the prior
    assert own_accuracy == 1.0
    assert not np.allclose(train(prior, lr=5e-3).params[HEAD_BIAS], start[HEAD_BIAS], atol=1e-4)  # it does train
    with pytest.raises(TrainerError, match="logit_prior"):
        train(prior[:2])


def test_own_labels_only_returns_the_head_rows_of_lacking_labels_as_given(trainer, dataset):
    """`--own-labels-only`: AdamW moves every head row by about the learning rate per step, even the
    rows of labels a device has no samples of; those rows must come back exactly as sent."""
    start, tier = _global_slots(trainer), trainer.tier
    target = np.full((len(tier.adapted_layers), tier.experts_held), 1 / tier.experts_held)
    kept = np.zeros(len(start[HEAD_BIAS]), dtype=bool)
    kept[1:] = True
    rounds = {}
    for name, mask in (("all", None), ("own", kept)):
        batches = take_steps(lambda: dataset.batches(tier.batch_size, np.random.default_rng(0)), 6)
        rounds[name] = trainer.train_round(start, batches, LossInputs(0.01, 0.01, target, kept_labels=mask),
                                           learning_rate=5e-3).params
    for head in (HEAD_WEIGHT, HEAD_BIAS):
        assert not np.allclose(rounds["all"][head][kept], start[head][kept], atol=1e-4)  # AdamW moved them
        np.testing.assert_array_equal(rounds["own"][head][kept], start[head][kept])
        np.testing.assert_array_equal(rounds["own"][head][~kept], rounds["all"][head][~kept])
    with pytest.raises(TrainerError, match="kept_labels"):
        trainer.train_round(start, [], LossInputs(0.01, 0.01, target, kept_labels=kept[:2]), learning_rate=1e-3)
