"""LSTMSequenceClassifier: scikit-learn API, padding, preprocessing, persistence."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from lstmkit.classify import LSTMSequenceClassifier
from test_classify_helpers import TINY, make_sequences

# scikit-learn's checks pass 2-D X (n_samples, n_features); this estimator reads that as
# (n_cases, n_steps) univariate series, where another "feature count" at predict time is just
# another length. Those checks do not apply.
_NOT_APPLICABLE = {
    "check_n_features_in_after_fitting": "2-D X is (n_cases, n_steps): a different n_steps is valid",
    "check_n_features_in": "2-D X is (n_cases, n_steps) of univariate series: n_features_in_ is 1",
    "check_classifiers_train": "needs > 83% training accuracy on tabular blobs; these checks train 3 epochs (speed)",
}


def _sk_estimators():
    # pooling/lr pinned: with 3 epochs (speed) check_class_weight_classifiers needs the fast-learning
    # last-step readout at lr 1e-2; with the defaults (max pooling, lr 5e-3) it fails that check's
    # > 87% threshold on tabular blobs read as univariate series
    return [
        LSTMSequenceClassifier(
            hidden_size=4, epochs=3, batch_size=64, lr=1e-2, pooling="last", validation_fraction=0.0,
            backend="reference",
        )
    ]


@parametrize_with_checks(_sk_estimators(), expected_failed_checks=lambda est: _NOT_APPLICABLE)
def test_sklearn_estimator_checks(estimator, check, monkeypatch):
    # the NumPy array-API check only asks that the variable be set (it is read when the check runs)
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


@pytest.fixture(scope="module")
def data():
    X, y = make_sequences(90, seed=0)
    Xt, yt = make_sequences(60, seed=1)
    return X, y, Xt, yt


@pytest.fixture(scope="module")
def fitted(data):
    X, y, _, _ = data
    return LSTMSequenceClassifier(**TINY).fit(X, y)


def test_learns_variable_length_problem(fitted, data):
    _, _, Xt, yt = data
    assert fitted.score(Xt, yt) >= 0.85
    assert list(fitted.classes_) == sorted(set(yt))
    assert fitted.n_features_in_ == 2


def test_padding_never_leaks(fitted, data):
    """A case's prediction does not depend on the cases batched with it (and their lengths)."""
    _, _, Xt, _ = data
    short = [c for c in Xt if len(c) <= 7][:3]
    alone = np.concatenate([fitted.predict_proba([c]) for c in short])
    batched = fitted.predict_proba(short + [np.full((40, 2), 1e3, np.float32)])[: len(short)]
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)


def test_input_layouts_agree(fitted, data):
    _, _, Xt, _ = data
    same = [c[:8] for c in Xt if len(c) >= 8][:10]
    as_list = fitted.predict_proba(same)
    as_3d = fitted.predict_proba(np.stack(same))
    np.testing.assert_allclose(as_3d, as_list, rtol=1e-6)
    cf = clone(fitted).set_params(channels_first=True)
    cf.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    np.testing.assert_allclose(cf.predict_proba(np.stack(same).transpose(0, 2, 1)), as_list, rtol=1e-6)
    with pytest.raises(ValueError, match=r"X has 8 features, but LSTMSequenceClassifier is expecting 2"):
        fitted.predict(np.stack(same).transpose(0, 2, 1))  # (n, 2, 8) read as (n, steps, 8 features)


def test_standardization_fitted_on_training_data(fitted, data):
    X, _, _, _ = data
    steps = np.concatenate(X)
    np.testing.assert_allclose(fitted.standardizer_.mean, steps.mean(0), rtol=1e-4)
    np.testing.assert_allclose(fitted.standardizer_.scale, steps.std(0), rtol=1e-4)


def test_predict_proba_is_a_distribution(fitted, data):
    _, _, Xt, _ = data
    p = fitted.predict_proba(Xt)
    assert p.shape == (len(Xt), 3)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)
    assert (fitted.predict(Xt) == fitted.classes_[p.argmax(1)]).all()


def test_save_load_identical_predictions(fitted, data, tmp_path):
    _, _, Xt, _ = data
    fitted.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "model.json"}
    loaded = LSTMSequenceClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict_proba(Xt), fitted.predict_proba(Xt))
    assert loaded.classes_.dtype == fitted.classes_.dtype
    assert loaded.get_params() == fitted.get_params() | {"device": "cpu"}


def test_pickle_and_clone(fitted, data):
    _, _, Xt, _ = data
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.predict_proba(Xt), fitted.predict_proba(Xt))
    fresh = clone(fitted)
    assert fresh.get_params() == fitted.get_params() and not hasattr(fresh, "model_")


def test_any_hashable_labels_and_integer_labels(data):
    X, y, Xt, yt = data
    mapping = {"slow": (0, "s"), "mid": (1, "m"), "fast": (2, "f")}
    yy = np.empty(len(y), dtype=object)
    yy[:] = [mapping[v] for v in y]
    clf = LSTMSequenceClassifier(**{**TINY, "epochs": 4}).fit(X, yy)
    pred = clf.predict(Xt)
    assert set(pred.tolist()) <= set(mapping.values())
    y_int = np.array([["slow", "mid", "fast"].index(v) for v in y])
    ints = LSTMSequenceClassifier(**{**TINY, "epochs": 4}).fit(X, y_int)
    assert ints.classes_.tolist() == [0, 1, 2] and ints.predict(Xt).dtype.kind == "i"


def test_seed_makes_fit_reproducible(data):
    X, y, Xt, _ = data
    a = LSTMSequenceClassifier(**{**TINY, "epochs": 3}).fit(X, y).predict_proba(Xt)
    b = LSTMSequenceClassifier(**{**TINY, "epochs": 3}).fit(X, y).predict_proba(Xt)
    np.testing.assert_array_equal(a, b)


def test_early_stopping_restores_best_weights(data, tmp_path):
    X, y, _, _ = data
    clf = LSTMSequenceClassifier(**{**TINY, "validation_fraction": 0.3, "patience": 3, "epochs": 60, "lr": 0.2})
    clf.fit(X, y, checkpoint_path=tmp_path / "ckpt.pt")
    h = clf.history_
    best = h["best_epoch"]
    assert best == int(np.argmin(h["val_loss"])) + 1
    assert len(h["epoch"]) == min(60, best + 3)  # stopped `patience` epochs after the best
    last = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert last["epoch"] == len(h["epoch"])
    for k, v in clf.model_.state_dict().items():
        torch.testing.assert_close(v, last["best_model"][k], rtol=0, atol=0)
    if best < len(h["epoch"]):
        assert any(not torch.equal(v, last["model"][k]) for k, v in clf.model_.state_dict().items())


def test_class_weight_balanced_and_dict(data):
    X, y, _, _ = data
    keep = y != "fast"
    idx = np.flatnonzero(keep).tolist() + np.flatnonzero(~keep)[:5].tolist()
    Xi, yi = [X[i] for i in idx], y[idx]
    clf = LSTMSequenceClassifier(**{**TINY, "epochs": 1, "class_weight": "balanced"}).fit(Xi, yi)
    w = clf._class_weights(np.searchsorted(clf.classes_, yi))
    counts = np.array([np.sum(yi == c) for c in clf.classes_])
    np.testing.assert_allclose(w.numpy(), len(yi) / (3 * counts), rtol=1e-6)
    clf2 = LSTMSequenceClassifier(**{**TINY, "epochs": 1, "class_weight": {"fast": 5.0}}).fit(Xi, yi)
    assert clf2._class_weights(None).tolist() == [5.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="class_weight: label 'nope'"):
        LSTMSequenceClassifier(**{**TINY, "epochs": 1, "class_weight": {"nope": 2.0}}).fit(Xi, yi)


@pytest.mark.parametrize("n_cases, batch_size, expected", [(40, 32, 250), (270, 32, 60), (90, 16, 84)])
def test_auto_epochs_give_small_sets_enough_steps(tmp_path, n_cases, batch_size, expected):
    X, y = make_sequences(n_cases, seed=2, max_len=6)

    class Stop(Exception):
        pass

    def stop(epoch, history):
        raise Stop

    clf = LSTMSequenceClassifier(**{**TINY, "epochs": "auto", "batch_size": batch_size})
    with pytest.raises(Stop):
        clf.fit(X, y, checkpoint_path=tmp_path / "c.pt", on_epoch_end=stop)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["scheduler"]["T_max"] == expected


def test_noise_augmentation_is_seeded_and_changes_training(data):
    X, y, Xt, _ = data
    fit = lambda **kw: LSTMSequenceClassifier(**{**TINY, "epochs": 2, **kw}).fit(X, y).predict_proba(Xt)  # noqa: E731
    plain, noisy = fit(), fit(noise=0.3)
    np.testing.assert_array_equal(noisy, fit(noise=0.3))
    assert not np.allclose(noisy, plain)
    with pytest.raises(ValueError, match=r"noise: expected a number >= 0, got -1"):
        LSTMSequenceClassifier(noise=-1).fit(X, y)


@pytest.mark.parametrize("pooling", ["mean", "max", "last+mean"])
def test_pooling_reaches_the_model_and_survives_save_load(data, tmp_path, pooling):
    X, y, Xt, _ = data
    est = LSTMSequenceClassifier(**{**TINY, "epochs": 2, "pooling": pooling}).fit(X, y)
    assert est.get_params()["pooling"] == pooling
    assert est.model_.pooling == pooling
    est.save(tmp_path / "m")
    loaded = LSTMSequenceClassifier.load(tmp_path / "m")
    assert loaded.pooling == pooling and loaded.model_.pooling == pooling
    np.testing.assert_array_equal(loaded.predict_proba(Xt), est.predict_proba(Xt))
    assert clone(est).set_params(pooling="last").pooling == "last"


def test_pooling_default_comes_from_defaults():
    from lstmkit.classify import DEFAULTS

    assert LSTMSequenceClassifier().pooling == DEFAULTS["pooling"]
