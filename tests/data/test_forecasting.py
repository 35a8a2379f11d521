"""LTSF loaders on hand-written tiny files: formats, LTSF-Linear split borders, a scaler
fitted on the train rows only, window counts, time features and every malformed-file error."""

import gzip

import numpy as np
import pytest

from ssmjax.data.forecasting import (
    StandardScaler,
    load_series,
    num_windows,
    prepare,
    read_lstnet_txt,
    read_ltsf_csv,
    resolve_data_file,
    split_borders,
    time_features,
    windows,
)


def write_csv(path, n_rows, columns=("a", "OT", "b"), start="2016-07-01 00:00:00", step_hours=1):
    t0 = np.datetime64(start.replace(" ", "T"), "s")
    lines = ["date," + ",".join(columns)]
    for i in range(n_rows):
        stamp = str(t0 + np.timedelta64(i * step_hours * 3600, "s")).replace("T", " ")
        lines.append(stamp + "," + ",".join(f"{100 * j + i}" for j in range(len(columns))))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_columns_target_last_and_dates(tmp_path):
    s = read_ltsf_csv(write_csv(tmp_path / "tiny.csv", 5))
    assert s.columns == ("a", "b", "OT")  # Dataset_Custom order: other columns, then the target
    np.testing.assert_array_equal(s.values[:, 0], np.arange(5))
    np.testing.assert_array_equal(s.values[:, 2], 100 + np.arange(5))
    assert s.dates[1] - s.dates[0] == np.timedelta64(3600, "s")
    assert s.name == "tiny"


def test_lstnet_txt_and_gz(tmp_path):
    text = "1.0,2.0\n3.0,4.0\n5.0,6.0\n"
    (tmp_path / "x.txt").write_text(text)
    (tmp_path / "y.txt.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("x.txt", "y.txt.gz"):
        s = load_series(tmp_path / name)
        np.testing.assert_array_equal(s.values, [[1, 2], [3, 4], [5, 6]])
        assert s.dates is None and s.columns == ("0", "1")


def test_custom_split_borders_70_10_20():
    # Dataset_Custom with n = 103, L = 5: n_train = 72, n_test = 20, n_val = 11.
    s = split_borders("tiny", 103, 5)
    assert (s.train, s.val, s.test) == ((0, 72), (67, 83), (78, 103))


def test_ett_split_borders():
    s = split_borders("ETTh1", 17420, 336)
    assert (s.train, s.val, s.test) == ((0, 8640), (8640 - 336, 11520), (11520 - 336, 14400))
    m = split_borders("ETTm2", 69680, 96)
    assert (m.train, m.val, m.test) == ((0, 34560), (34560 - 96, 46080), (46080 - 96, 57600))
    with pytest.raises(ValueError, match="needs 14400 rows"):
        split_borders("ETTh1", 1000, 96)


def test_scaler_fitted_on_train_rows_only(tmp_path):
    s = read_ltsf_csv(write_csv(tmp_path / "tiny.csv", 100))
    data = prepare(s, seq_len=4, horizon=2)
    train = s.values[:70]
    np.testing.assert_allclose(data.scaler.mean, train.mean(0))
    np.testing.assert_allclose(data.scaler.std, train.std(0))  # population std, as sklearn
    np.testing.assert_allclose(data.scaled, (s.values - train.mean(0)) / train.std(0))
    np.testing.assert_allclose(data.scaled[:70].mean(0), 0.0, atol=1e-12)
    assert np.all(data.scaled[70:].mean(0) > 1.0)  # the later rows are not re-centred
    np.testing.assert_allclose(StandardScaler.fit(train).inverse(data.scaled), s.values)


def test_window_counts_and_contents(tmp_path):
    s = read_ltsf_csv(write_csv(tmp_path / "tiny.csv", 100))
    L, H = 4, 3
    data = prepare(s, L, H)
    # val part: rows [66, 80) -> 14 - 4 - 3 + 1 = 8 windows; test: [76, 100) -> 24 - 6 = 18; train 70 - 6 = 64.
    for split, count in (("train", 64), ("val", 8), ("test", 18)):
        assert len(data.starts(split, H)) == count == num_windows(int(np.subtract(*data.part(split)[::-1])), L, H)
    x, y = data.windows("val", H)
    assert x.shape == (8, L, 3) and y.shape == (8, H, 3)
    np.testing.assert_array_equal(x[2], data.scaled[66 + 2:66 + 2 + L])
    np.testing.assert_array_equal(y[2], data.scaled[66 + 2 + L:66 + 2 + L + H])
    rows = np.arange(10.0)[:, None]
    x, y = windows(rows, 3, 2)
    assert len(x) == 6 and x[-1, :, 0].tolist() == [5, 6, 7] and y[-1, :, 0].tolist() == [8, 9]


def test_time_features_hourly():
    dates = np.array(["2016-07-01T00:00:00", "2016-07-04T23:00:00", "2017-01-01T12:00:00"], "datetime64[s]")
    f = time_features(dates, "h")
    # hour/23, weekday/6 (Mon = 0; 2016-07-01 Friday, 07-04 Monday, 2017-01-01 Sunday), (day-1)/30, (yday-1)/365
    expected = np.array([[0, 4 / 6, 0, 182 / 365], [1, 0, 3 / 30, 185 / 365], [12 / 23, 1, 0, 0]]) - 0.5
    np.testing.assert_allclose(f, expected)
    assert time_features(dates, "t").shape == (3, 5)
    with pytest.raises(ValueError, match="freq"):
        time_features(dates, "fortnight")


def test_lstnet_has_no_time_features(tmp_path):
    (tmp_path / "x.txt").write_text("\n".join(f"{i},{2 * i}" for i in range(50)))
    assert prepare(load_series(tmp_path / "x.txt"), 4, 2).marks is None


@pytest.mark.parametrize("content, match", [
    ("a,OT\n1,2\n", "no 'date' column"),
    ("date,a,OT\n2016-07-01 00:00:00,1,2\n2016-07-01 01:00:00,1\n", "row 3: ragged row"),
    ("date,a,OT\n2016-07-01 00:00:00,1,2\n2016-07-01 01:00:00,x,2\n", "row 3, column 'a': non-numeric cell 'x'"),
    ("date,a,OT\nyesterday,1,2\n", "row 2, column 'date': cannot parse date"),
    ("date,a,b\n2016-07-01 00:00:00,1,2\n", "target column 'OT'"),
    ("", "empty file"),
])
def test_malformed_csv(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_ltsf_csv(path)
    assert str(path) in str(err.value)


def test_malformed_txt(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("1,2\n3,4\n5\n")
    with pytest.raises(ValueError, match=r"bad.txt: row 3: ragged row"):
        read_lstnet_txt(path)
    path.write_text("1,2\n3,nan?\n")
    with pytest.raises(ValueError, match=r"bad.txt: row 2, column '1': non-numeric cell"):
        read_lstnet_txt(path)


def test_missing_file_and_too_few_rows(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_series(tmp_path / "nothing.csv")
    with pytest.raises(ValueError, match="'nothing.csv' not found in data dir"):
        resolve_data_file("nothing.csv", tmp_path)
    s = read_ltsf_csv(write_csv(tmp_path / "tiny.csv", 30))
    prepare(s, seq_len=4, horizon=4 - 1)  # n_val = 3: the val part is 3 + L = 7 rows, one window of 4 + 3
    with pytest.raises(ValueError, match=r"tiny.csv: row 25: the val part has 7 rows, too few for seq_len 4"):
        prepare(s, seq_len=4, horizon=4)
    with pytest.raises(ValueError, match=r"tiny.csv: row 31: too few rows \(30\)"):
        prepare(s, seq_len=24, horizon=24)


def test_resolve_short_names_and_env(tmp_path, monkeypatch):
    (tmp_path / "ETTh1.csv").write_text("date,OT\n")
    (tmp_path / "exchange_rate.txt.gz").write_bytes(b"")
    assert resolve_data_file("ETTh1", tmp_path) == tmp_path / "ETTh1.csv"
    assert resolve_data_file("exchange", tmp_path) == tmp_path / "exchange_rate.txt.gz"
    monkeypatch.setenv("SSMJAX_DATA", str(tmp_path))
    assert resolve_data_file("etth1") == tmp_path / "ETTh1.csv"
