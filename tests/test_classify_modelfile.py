"""A saved model folder is checked against its schema on load: nothing in it reaches the process
unchecked, and every error names the file and the field."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lstmkit.classify import DEFAULTS, LSTMSequenceClassifier, ModelFileError
from lstmkit.cli import main
from test_classify_helpers import TINY, make_sequences


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    X, y = make_sequences(30, seed=0)
    d = tmp_path_factory.mktemp("model") / "m"
    LSTMSequenceClassifier(**{**TINY, "epochs": 1}).fit(X, y).save(d)
    return d


@pytest.fixture
def model(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    return d


def _edit(folder, change):
    path = folder / "model.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(*keys, value):
    def change(config):
        node = config
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    "change, field, message",
    [
        (_set("params", "num_threads", value=1000000), "params.num_threads",
         "expected None or an integer in [1, 1024], got 1000000"),
        (_set("classes", value=["fast", "mid"]), "classes", "expected 3 labels (model.output_size), got 2"),
        (_set("preprocessing", "scale", value=[1.0, 0.0]), "preprocessing.scale[1]",
         "expected a number > 0 (a standard deviation), got 0.0"),
        (_set("preprocessing", "mean", value=[0.0]), "preprocessing.mean",
         "expected 2 numbers (one per input feature, model.input_size), got 1"),
        (_set("preprocessing", "mean", value=[0.0, float("nan")]), "preprocessing.mean[1]",
         "expected a finite number, got nan"),
        (_set("model", "hidden_size", value="64"), "model.hidden_size", "expected an integer in [1, 65536], got '64'"),
        (_set("model", "num_layers", value=True), "model.num_layers", "expected an integer in [1, 256], got True"),
        (_set("model", "pooling", value="sum"), "model.pooling", "expected one of ['last', 'mean', 'max', 'last+"),
        (_set("params", "hidden_size", value=32), "params.hidden_size", "32 disagrees with model.hidden_size (8)"),
        (_set("params", "bogus", value=1), "params", "unknown parameter(s) ['bogus']"),
        (_set("params", "backend", value="cuda-magic"), "params.backend", "expected one of ['auto', 'triton'"),
        (_set("classes_dtype", value="<U2"), "classes_dtype", "the labels do not survive conversion to '<U2'"),
        (_set("classes_dtype", value="|O"), "classes_dtype", "expected 'object' or a numpy dtype of kind"),
        (_set("format", value="other/2"), "format", "expected 'lstmkit.classify/1', got 'other/2'"),
        (lambda c: c.pop("preprocessing"), "top level", "missing key(s) ['preprocessing']"),
        (_set("history", "loss", value=[1.0, 2.0]), "history.loss", "expected a list as long as history.epoch (1)"),
    ],
)
def test_model_json_fields_are_checked(model, change, field, message):
    _edit(model, change)
    with pytest.raises(ModelFileError) as exc:
        LSTMSequenceClassifier.load(model)
    assert str(exc.value).startswith(f"{model / 'model.json'}: {field}: "), str(exc.value)
    assert message in str(exc.value)


def test_model_json_that_is_not_an_object(model):
    (model / "model.json").write_text("[1, 2, 3]\n")
    with pytest.raises(ModelFileError, match=r"model\.json: top level: expected an object, got list"):
        LSTMSequenceClassifier.load(model)
    (model / "model.json").write_text("{\"format\": ")
    with pytest.raises(ValueError, match=r"model\.json:1: malformed JSON"):
        LSTMSequenceClassifier.load(model)


def test_a_large_hidden_size_fails_on_the_header_before_allocating(model, monkeypatch):
    """hidden_size 4096 in model.json against weights of 8: refused from the file's header."""
    _edit(model, _set("model", "hidden_size", value=4096))
    _edit(model, _set("params", "hidden_size", value=4096))
    import lstmkit.classify._estimator as E

    built = []
    real_build = E.LSTMSequenceClassifier._build_model

    def spy(self, n_features, n_classes):
        m = real_build(self, n_features, n_classes)
        built.append(next(m.parameters()).device.type)
        return m

    monkeypatch.setattr(E.LSTMSequenceClassifier, "_build_model", spy)
    with pytest.raises(ModelFileError, match=r"model\.safetensors: tensor 'lstm\.weight_ih_l0' has shape \[32, 2\] "
                                             r"but model\.json describes \[16384, 2\]"):
        LSTMSequenceClassifier.load(model)
    assert built == ["meta"]  # no real model was built (a 4096 one allocates gigabytes)


def test_weights_with_nan_are_refused(model):
    tensors = load_file(model / "model.safetensors")
    tensors["fc.bias"][0] = float("nan")
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"model\.safetensors: tensor 'fc\.bias' holds NaN or inf values"):
        LSTMSequenceClassifier.load(model)


def test_truncated_and_mismatched_weight_files(model, tmp_path):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.safetensors: not a readable safetensors file"):
        LSTMSequenceClassifier.load(model)
    X, y = make_sequences(30, seed=0)
    LSTMSequenceClassifier(**{**TINY, "epochs": 1, "num_layers": 2}).fit(X, y).save(tmp_path / "two")
    shutil.copy(tmp_path / "two" / "model.safetensors", model / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"the tensors do not match the model in model\.json \(missing \[\], "
                                             r"unexpected \['lstm\.bias_hh_l1'"):
        LSTMSequenceClassifier.load(model)
    tensors = load_file(tmp_path / "two" / "model.safetensors")
    save_file({k: v.double() for k, v in tensors.items()}, tmp_path / "two" / "model.safetensors")
    shutil.copy(tmp_path / "two" / "model.safetensors", model / "model.safetensors")
    _edit(model, _set("model", "num_layers", value=2))
    _edit(model, _set("params", "num_layers", value=2))
    with pytest.raises(ModelFileError, match=r"has dtype F64, expected F32"):
        LSTMSequenceClassifier.load(model)


def test_cli_reports_a_damaged_model_in_one_line(model, capsys):
    _edit(model, _set("params", "num_threads", value=1000000))
    assert main(["predict", str(model), "--dataset", "BasicMotions"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"lstmkit predict: error: {model / 'model.json'}: params.num_threads: ")


def test_a_valid_model_still_loads_and_predicts_the_same(saved):
    X, _ = make_sequences(5, seed=4)
    loaded = LSTMSequenceClassifier.load(saved)
    again = LSTMSequenceClassifier.load(saved)
    np.testing.assert_array_equal(loaded.predict_proba(X), again.predict_proba(X))
    assert next(loaded.model_.parameters()).device == torch.device("cpu")


def test_estimator_bounds_num_threads_before_touching_torch():
    X, y = make_sequences(12, seed=0)
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"num_threads: expected None or an integer in \[1, 1024\], got 1000000"):
        LSTMSequenceClassifier(**{**TINY, "num_threads": 1000000}).fit(X, y)
    with pytest.raises(ValueError, match=r"num_threads: expected None or an integer in \[1, 1024\], got 0"):
        LSTMSequenceClassifier(**{**TINY, "num_threads": 0}).fit(X, y)
    assert torch.get_num_threads() == before


def test_save_describes_the_fitted_network_not_later_parameters(saved, tmp_path):
    est = LSTMSequenceClassifier.load(saved)
    X, _ = make_sequences(5, seed=4)
    expected = est.predict_proba(X)
    est.set_params(hidden_size=999, pooling="mean")  # after fit: the weights stay those of hidden_size 8
    est.save(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "model.json").read_text())
    assert config["model"]["hidden_size"] == config["params"]["hidden_size"] == 8
    assert config["model"]["pooling"] == config["params"]["pooling"] == DEFAULTS["pooling"]
    np.testing.assert_array_equal(LSTMSequenceClassifier.load(tmp_path / "again").predict_proba(X), expected)
