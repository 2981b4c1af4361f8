"""File readers and bad input: every error names the file or argument, and the line where there is one."""

from __future__ import annotations

import numpy as np
import pytest

from lstmkit.classify import DataFileError, LSTMSequenceClassifier, list_datasets, load_dataset, read_data, write_csv
from lstmkit.classify._runs import DataSpec, RunError, align_labels, train_run
from test_classify_helpers import TINY, make_sequences

TS_HEADER = """# a comment
@problemName tiny
@timeStamps false
@missing false
@univariate false
@equalLength false
@classLabel true a b
@data
"""


def _ts(tmp_path, body: str, name="tiny.ts"):
    p = tmp_path / name
    p.write_text(TS_HEADER + body)
    return p


def test_bundled_datasets_load_offline():
    assert {"JapaneseVowels", "BasicMotions", "GunPoint", "ArrowHead", "ItalyPowerDemand"} <= set(list_datasets())
    X, y = load_dataset("JapaneseVowels", "train")
    Xt, yt = load_dataset("japanesevowels", "test")
    assert (len(X), len(Xt)) == (270, 370)
    assert {c.shape[1] for c in X + Xt} == {12}
    lengths = [len(c) for c in X + Xt]
    assert (min(lengths), max(lengths)) == (7, 29)
    assert len(set(y.tolist())) == 9
    with pytest.raises(ValueError, match=r"dataset: expected one of \[.*'JapaneseVowels'.*\], got 'Nope'"):
        load_dataset("Nope")


def test_ts_variable_length_multichannel(tmp_path):
    p = _ts(tmp_path, "1.0,2.0,3.0:4.0,5.0,6.0:a\n7.0,8.0:9.0,10.0:b\n")
    X, y = read_data(p)
    assert [c.shape for c in X] == [(3, 2), (2, 2)]
    np.testing.assert_array_equal(X[0][:, 1], [4, 5, 6])
    assert y.tolist() == ["a", "b"]


@pytest.mark.parametrize(
    "body, line",
    [
        ("1.0,2.0:3.0,4.0:a\n1.0,oops:3.0,4.0:b\n", 10),  # not a number
        ("1.0,2.0:3.0,4.0:a\n1.0,2.0:3.0,4.0:5.0,6.0:b\n1.0:2.0:a\n", 10),  # 3 channels where 2 were
        ("1.0,2.0:3.0,4.0:a\n1.0,2.0:3.0,4.0:b\n1.0,2.0,3.0:4.0:a\n", 11),  # channels of unequal length
    ],
)
def test_ts_malformed_names_the_line(tmp_path, body, line):
    p = _ts(tmp_path, body)
    with pytest.raises(DataFileError, match=rf"tiny\.ts:{line}: malformed \.ts file"):
        read_data(p)


def test_ts_bad_header_line(tmp_path):
    p = tmp_path / "h.ts"
    p.write_text("@problemName x\n@univariate maybe yes\n@classLabel true a\n@data\n1.0:a\n")
    with pytest.raises(DataFileError, match=r"h\.ts:2: malformed .ts file: @univariate tag requires a boolean"):
        read_data(p)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataFileError, match=r"data file '.*nothere\.csv' does not exist"):
        read_data(tmp_path / "nothere.csv")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(DataFileError, match=r"expected a suffix in \['.ts', '.npz', '.csv'\], got '.parquet'"):
        read_data(tmp_path / "x.parquet")


def test_csv_round_trip(tmp_path):
    X, y = make_sequences(7, n_features=3)
    write_csv(tmp_path / "d.csv", X, y)
    X2, y2 = read_data(tmp_path / "d.csv")
    assert y2.tolist() == y.tolist()
    for a, b in zip(X, X2):
        np.testing.assert_array_equal(a, b)


def test_csv_rows_in_any_order_sorted_by_time_step(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,t,f0,label\ns1,2,3.0,x\ns2,0,9.0,y\ns1,0,1.0,x\ns1,1,2.0,x\n")
    X, y = read_data(p)
    np.testing.assert_array_equal(X[0][:, 0], [1, 2, 3])
    assert y.tolist() == ["x", "y"] and X[1].shape == (1, 1)


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,t,f0,label\ns1,0,1.0,x\ns1,1,2.0\n", r"d\.csv:3: expected 4 columns \(as the header\), got 3"),
        ("id,t,f0,label\ns1,0,1.0,x\ns1,1,abc,x\n", r"d\.csv:3: feature values must be numbers"),
        ("id,t,f0,label\ns1,0,1.0,x\ns1,one,2.0,x\n", r"d\.csv:3: time_step must be an integer, got 'one'"),
        ("id,t,f0,label\ns1,0,1.0,x\n\ns1,1,2.0,y\n", r"d\.csv:4: sequence 's1' has label 'y' here but 'x' on line 2"),
        ("id,t,f0,label\ns1,0,1.0,x\ns1,0,2.0,x\n", r"d\.csv:3: sequence 's1' repeats time_step 0 \(first on line 2\)"),
        ("id,t,label\ns1,0,x\n", r"d\.csv:1: expected a header .* at least 4 columns, got 3"),
        ("", r"d\.csv: empty file"),
        ("id,t,f0,label\n", r"d\.csv: no data rows"),
    ],
)
def test_csv_malformed_names_the_line(tmp_path, text, match):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DataFileError, match=match):
        read_data(tmp_path / "d.csv")


def test_npz_padded_with_lengths_and_channels_first(tmp_path):
    X = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.savez(tmp_path / "d.npz", X=X, y=np.array([0, 1]), lengths=np.array([4, 2]))
    cases, y = read_data(tmp_path / "d.npz")
    assert [c.shape for c in cases] == [(4, 3), (2, 3)] and y.tolist() == [0, 1]
    np.testing.assert_array_equal(cases[1], X[1, :2])
    np.savez(tmp_path / "c.npz", X=X.transpose(0, 2, 1), y=np.array([0, 1]))
    cf, _ = read_data(tmp_path / "c.npz", channels_first=True)
    np.testing.assert_array_equal(cf[0], X[0])


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"X": np.zeros((2, 3, 1))}, r"expected arrays 'X' and 'y'"),
        ({"X": np.zeros((2, 3, 1)), "y": np.zeros(3)}, r"'y' must be 1-D with 2 labels"),
        ({"X": np.zeros((2, 3, 1)), "y": np.zeros(2), "lengths": np.array([3, 4])}, r"lengths\[1\] = 4 is outside"),
    ],
)
def test_npz_malformed(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataFileError, match=match):
        read_data(tmp_path / "d.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFileError, match=r"junk\.npz: not a readable \.npz"):
        read_data(tmp_path / "junk.npz")


@pytest.fixture(scope="module")
def data():
    return make_sequences(60, seed=3)


def test_nan_or_inf_names_the_case(data):
    X, y = data
    X = [c.copy() for c in X]
    X[7][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"X\[7\] contains NaN or inf \(first at step 2, feature 1: nan\).*impute"):
        LSTMSequenceClassifier(**TINY).fit(X, y)
    X[7][2, 1] = 0.0
    clf = LSTMSequenceClassifier(**{**TINY, "epochs": 2}).fit(X, y)
    bad = [X[0].copy()]
    bad[0][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"X\[0\] contains NaN or inf"):
        clf.predict(bad)


def test_imputation_options(data):
    X, y = data
    X = [c.copy() for c in X]
    X[3][1:3, 0] = np.nan
    for how in ("zero", "ffill"):
        clf = LSTMSequenceClassifier(**{**TINY, "epochs": 2, "impute": how}).fit(X, y)
        assert np.isfinite(clf.predict_proba(X)).all()
        assert np.isfinite(clf.standardizer_.mean).all()
    z = clf.standardizer_.transform([X[3]], "ffill")[0]
    assert z[1, 0] == z[0, 0] == z[2, 0]
    zero = clf.standardizer_.transform([X[3]], "zero")[0]
    assert zero[1, 0] == 0.0
    with pytest.raises(ValueError, match=r"impute: expected one of \[None, 'zero', 'ffill'\], got 'mean'"):
        LSTMSequenceClassifier(impute="mean").fit(X, y)


def test_feature_count_must_match(data):
    X, y = data
    clf = LSTMSequenceClassifier(**{**TINY, "epochs": 1}).fit(X, y)
    with pytest.raises(ValueError, match=r"X has 3 features, but LSTMSequenceClassifier is expecting 2 features"):
        clf.predict([np.zeros((5, 3), np.float32)])
    with pytest.raises(ValueError, match=r"X\[1\]: expected 2 features \(as X\[0\]\), got 4"):
        clf.predict([np.zeros((5, 2)), np.zeros((5, 4))])


def test_empty_sequence_is_an_error(data):
    X, y = data
    X = list(X)
    X[4] = np.zeros((0, 2), np.float32)
    with pytest.raises(ValueError, match=r"X\[4\]: empty sequence \(0 time steps\)"):
        LSTMSequenceClassifier(**TINY).fit(X, y)


def test_bad_parameters_named(data):
    X, y = data
    with pytest.raises(ValueError, match=r"hidden_size: expected an integer in \[1, 65536\], got 0"):
        LSTMSequenceClassifier(hidden_size=0).fit(X, y)
    with pytest.raises(ValueError, match=r"pooling: expected one of \[.*'last\+mean'\], got 'sum'"):
        LSTMSequenceClassifier(pooling="sum").fit(X, y)
    with pytest.raises(ValueError, match=r"y: expected 60 labels \(one per case of X\), got 59"):
        LSTMSequenceClassifier().fit(X, y[:-1])
    with pytest.raises(ValueError, match=r"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        LSTMSequenceClassifier(**{**TINY, "device": "tpu"}).fit(X, y)


def test_unseen_labels_at_evaluate():
    classes = np.array(["1", "2", "3"])
    assert align_labels(np.array([1, 3]), classes, "f").tolist() == ["1", "3"]
    with pytest.raises(ValueError, match=r"f: labels \['7'\] were never seen in training"):
        align_labels(np.array(["1", "7"]), classes, "f")


def test_run_folder_that_exists_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunError, match=r"run folder '.*run' already exists.*--resume"):
        train_run(DataSpec(), params=dict(TINY), run_dir=tmp_path / "run")
    with pytest.raises(RunError, match=r"not a run folder \(run.json is missing\)"):
        train_run(DataSpec(), resume=tmp_path / "run")


def test_unlabelled_files_for_predict(tmp_path):
    p = tmp_path / "u.ts"
    p.write_text("@problemName u\n@univariate true\n@equalLength false\n@classLabel false\n@data\n"
                 "1.0,2.0,3.0\n4.0,5.0\n")
    X, y = read_data(p, labels=False)
    assert y is None and [c.shape for c in X] == [(3, 1), (2, 1)]
    with pytest.raises(DataFileError, match=r"u\.ts: expected class labels"):
        read_data(p)
    (tmp_path / "u.csv").write_text("id,t,f0,f1\na,0,1.0,2.0\na,1,3.0,4.0\n")
    X, y = read_data(tmp_path / "u.csv", labels=False)
    assert y is None and X[0].shape == (2, 2)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from lstmkit.classify._checkpoint import atomic_write, write_json

    target = tmp_path / "ckpt.json"
    write_json(target, {"epoch": 1})

    def half_then_crash(tmp):
        with open(tmp, "w") as fh:
            fh.write('{"epoch": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text().strip() == '{\n  "epoch": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]
