"""Long-term time-series forecasting data: file formats, splits, scaling and windows.

The protocol is the one of LTSF-Linear (Zeng et al., 2023, "Are Transformers Effective for
Time Series Forecasting?", AAAI; ``data_provider/data_loader.py``), which iTransformer
(Liu et al., 2024, "iTransformer: Inverted Transformers Are Effective for Time Series
Forecasting", ICLR) reuses:

* **Formats.** The LTSF CSV format: a header, a ``date`` column, feature columns and a
  target column (``--target``, default ``OT``). The multivariate ("M") setting uses every
  column except ``date``, reordered so that the target is last (``Dataset_Custom``). The
  LSTNet format (Lai et al., 2018): comma-separated floats, no header, no dates, one row
  per time step (``.txt`` or ``.txt.gz``); every column is a variate.
* **Splits** (row borders ``[b1, b2)`` of the train / val / test parts; the val and test
  parts start ``L = seq_len`` rows early so that their first target has a full look-back):

  - ETTh*: 12 / 4 / 4 months of 30 days x 24 hours: ``b1 = [0, 8640 - L, 11520 - L]``,
    ``b2 = [8640, 11520, 14400]``; ETTm* the same in 15-minute rows (x 4).
  - anything else (``Dataset_Custom``): ``n_train = int(0.7 n)``, ``n_test = int(0.2 n)``,
    ``n_val = n - n_train - n_test``; ``b1 = [0, n_train - L, n - n_test - L]``,
    ``b2 = [n_train, n_train + n_val, n]``.
* **Scaling.** ``z = (v - mean) / std`` per column, mean and (population) std of the
  **train rows only** (sklearn's ``StandardScaler``); metrics are reported on ``z``.
* **Windows.** Part ``rows`` of ``m`` rows gives ``m - L - H + 1`` windows,
  ``x_i = rows[i : i + L]`` and ``y_i = rows[i + L : i + L + H]``.
* **Time features** (``timeenc=1`` of the reference code, Informer's ``timefeatures.py``):
  calendar fields scaled to ``[-0.5, 0.5]``, e.g. hourly data: hour / 23 - 0.5,
  weekday / 6 - 0.5, (day of month - 1) / 30 - 0.5, (day of year - 1) / 365 - 0.5.
  iTransformer embeds them as extra variate tokens. LSTNet files have no dates, so they
  have no time features (``None``).

A missing or malformed file raises ``ValueError`` naming the file, the row (1-based line
of the file) and the problem.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float

from ssmjax.data.paths import default_data_dir

#: Short names of the shipped data sets -> file names in the data directory.
KNOWN_FILES = {"etth1": "ETTh1.csv", "etth2": "ETTh2.csv", "ettm1": "ETTm1.csv", "ettm2": "ETTm2.csv",
               "exchange": "exchange_rate.txt.gz", "exchange_rate": "exchange_rate.txt.gz"}

#: Rows per "month" of the ETT split (30 days of 24 hours).
ETT_MONTH_HOURS = 30 * 24


@dataclass(frozen=True)
class SeriesData:
    """A multivariate series read from one file.

    ``values [n, C]`` (float64, raw units, target last for the CSV format), ``columns``
    (names; ``"0".."C-1"`` for LSTNet files), ``dates`` (``datetime64[s]`` per row, or
    ``None``), ``path`` and ``name`` (file name without its suffixes, e.g. ``"ETTh1"``).
    """

    values: np.ndarray
    columns: tuple[str, ...]
    dates: np.ndarray | None
    path: Path
    name: str


@dataclass(frozen=True)
class Splits:
    """Row borders ``[(b1, b2)]`` of train, val and test (val/test start ``seq_len`` early)."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


# ----------------------------------------------------------------------------- locating


def resolve_data_file(data: str, data_dir: str | Path | None = None) -> Path:
    """The file of data set ``data``: a short name (``ETTh1``, ``ETTh2``, ``exchange``, see
    :data:`KNOWN_FILES`) or a file name under the data dir (``--data-dir``, else
    :func:`default_data_dir`), or a path. ``ValueError`` if it does not exist."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"data: expected a data set name or file name, got {data!r}")
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    name = KNOWN_FILES.get(data.lower(), data)
    candidates = [Path(name)] if Path(name).is_absolute() else []
    if base is not None:
        candidates.append(base / name)
    candidates.append(Path(name))
    for path in candidates:
        if path.is_file():
            return path
    where = f"in data dir {str(base)!r}" if base is not None else \
        "(no data dir: pass --data-dir or set SSMJAX_DATA; ../shared/data does not exist)"
    raise ValueError(f"data: file {name!r} not found {where}")


def series_name(path: str | Path) -> str:
    """``ETTh1`` for ``.../ETTh1.csv``, ``exchange_rate`` for ``exchange_rate.txt.gz``."""
    name = Path(path).name
    for suffix in (".gz", ".txt", ".csv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the file ({err})") from err


def _parse_float(path: Path, line: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"{path}: row {line}, column {column!r}: non-numeric cell {cell!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{path}: row {line}, column {column!r}: non-finite cell {cell!r}")
    return value


def _parse_date(path: Path, line: int, cell: str) -> np.datetime64:
    try:
        return np.datetime64(cell.strip().replace(" ", "T"), "s")
    except ValueError:
        raise ValueError(f"{path}: row {line}, column 'date': cannot parse date {cell!r}") from None


def read_ltsf_csv(path: str | Path, target: str = "OT") -> SeriesData:
    """An LTSF CSV file: header with ``date`` and ``target`` columns; returns every other
    column, then the target (LTSF-Linear's ``Dataset_Custom`` order, features ``"M"``)."""
    path = Path(path)
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    if not rows:
        raise ValueError(f"{path}: row 1: empty file, expected a header with a 'date' column")
    header = [h.strip() for h in rows[0]]
    if "date" not in header:
        raise ValueError(f"{path}: row 1: no 'date' column in the header {header}")
    if target not in header:
        raise ValueError(f"{path}: row 1: target column {target!r} (--target) not in the header {header}")
    date_col = header.index("date")
    features = [i for i, h in enumerate(header) if i != date_col and h != target] + [header.index(target)]
    values, dates = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line (e.g. trailing newline)
        if len(row) != len(header):
            raise ValueError(f"{path}: row {line}: ragged row, {len(row)} cells where the header has {len(header)}")
        dates.append(_parse_date(path, line, row[date_col]))
        values.append([_parse_float(path, line, header[i], row[i]) for i in features])
    if not values:
        raise ValueError(f"{path}: row 2: no data rows after the header")
    return SeriesData(np.asarray(values, np.float64), tuple(header[i] for i in features),
                      np.asarray(dates, "datetime64[s]"), path, series_name(path))


def read_lstnet_txt(path: str | Path) -> SeriesData:
    """An LSTNet ``.txt(.gz)`` file: comma-separated floats, no header, no dates; every column
    is a variate (for exchange_rate the last is LTSF-Linear's ``OT``)."""
    path = Path(path)
    values, width = [], None
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        cells = text.split(",")
        if width is None:
            width = len(cells)
        elif len(cells) != width:
            raise ValueError(f"{path}: row {line}: ragged row, {len(cells)} cells where row 1 has {width}")
        values.append([_parse_float(path, line, str(j), c) for j, c in enumerate(cells)])
    if not values:
        raise ValueError(f"{path}: row 1: empty file, expected comma-separated floats")
    return SeriesData(np.asarray(values, np.float64), tuple(str(j) for j in range(width)), None, path,
                      series_name(path))


def load_series(path: str | Path, target: str = "OT") -> SeriesData:
    """:func:`read_ltsf_csv` for ``.csv`` files, :func:`read_lstnet_txt` for ``.txt``/``.txt.gz``."""
    path = Path(path)
    if path.name.endswith(".csv") or path.name.endswith(".csv.gz"):
        return read_ltsf_csv(path, target)
    if path.name.endswith(".txt") or path.name.endswith(".txt.gz"):
        return read_lstnet_txt(path)
    raise ValueError(f"{path}: unknown format; expected an LTSF '.csv' or an LSTNet '.txt'/'.txt.gz' file")


# ----------------------------------------------------------------------------- protocol


def split_borders(name: str, n_rows: int, seq_len: int) -> Splits:
    """LTSF-Linear's train/val/test row borders (module docstring) for data set ``name``
    (``ETTh*`` / ``ETTm*`` by prefix, anything else 70/10/20) with ``n_rows`` rows."""
    if name.startswith("ETTh") or name.startswith("ETTm"):
        month = ETT_MONTH_HOURS * (4 if name.startswith("ETTm") else 1)
        b2 = [12 * month, 16 * month, 20 * month]
        if n_rows < b2[2]:
            raise ValueError(f"{name}: the ETT split needs {b2[2]} rows (12/4/4 months), the file has {n_rows}")
        b1 = [0, b2[0] - seq_len, b2[1] - seq_len]
    else:
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        b1 = [0, n_train - seq_len, n_rows - n_test - seq_len]
        b2 = [n_train, n_train + n_val, n_rows]
    if min(b1) < 0:
        raise ValueError(f"{name}: seq_len {seq_len} is longer than the train part ({b2[0]} rows)")
    return Splits((b1[0], b2[0]), (b1[1], b2[1]), (b1[2], b2[2]))


@dataclass(frozen=True)
class StandardScaler:
    """``z = (v - mean) / std`` per column (population std, as sklearn's StandardScaler)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, rows: Float[np.ndarray, "n c"]) -> StandardScaler:
        std = rows.std(0)
        return cls(rows.mean(0), np.where(std == 0.0, 1.0, std))  # sklearn leaves constant columns unscaled

    def transform(self, rows: Float[np.ndarray, "n c"]) -> Float[np.ndarray, "n c"]:
        return (rows - self.mean) / self.std

    def inverse(self, rows: Float[np.ndarray, "n c"]) -> Float[np.ndarray, "n c"]:
        return rows * self.std + self.mean


def num_windows(n_rows: int, seq_len: int, horizon: int) -> int:
    """``n_rows - seq_len - horizon + 1`` (may be <= 0)."""
    return n_rows - seq_len - horizon + 1


def windows(rows: Float[np.ndarray, "n c"], seq_len: int, horizon: int
            ) -> tuple[Float[np.ndarray, "w l c"], Float[np.ndarray, "w h c"]]:
    """All windows of a part: ``x[i] = rows[i:i+L]``, ``y[i] = rows[i+L:i+L+H]`` (copies)."""
    count = num_windows(len(rows), seq_len, horizon)
    if count < 1:
        raise ValueError(f"rows: {len(rows)} rows are too few for seq_len {seq_len} + horizon {horizon}")
    starts = np.arange(count)
    x = rows[starts[:, None] + np.arange(seq_len)]
    y = rows[starts[:, None] + seq_len + np.arange(horizon)]
    return x, y


_TIME_FEATURES = {  # Informer/LTSF-Linear timefeatures.py: offset -> features
    "s": ("second", "minute", "hour", "weekday", "monthday", "yearday"),
    "t": ("minute", "hour", "weekday", "monthday", "yearday"),
    "h": ("hour", "weekday", "monthday", "yearday"),
    "d": ("weekday", "monthday", "yearday"),
    "b": ("weekday", "monthday", "yearday"),
    "w": ("monthday", "yearweek"),
    "m": ("month",),
}


def time_features(dates: np.ndarray, freq: str = "h") -> Float[np.ndarray, "n f"]:
    """Calendar features in ``[-0.5, 0.5]`` (``timeenc=1``), one column per feature of
    ``freq`` (``s``, ``t``/``min``, ``h``, ``d``, ``b``, ``w``, ``m``), e.g. for ``h``:
    ``hour/23 - .5, weekday/6 - .5, (monthday-1)/30 - .5, (yearday-1)/365 - .5``."""
    freq = {"min": "t", "15min": "t", "10min": "t", "5min": "t"}.get(freq, freq).lower()
    if freq not in _TIME_FEATURES:
        raise ValueError(f"freq: expected one of {tuple(_TIME_FEATURES)}, got {freq!r}")
    dates = np.asarray(dates, "datetime64[s]")
    seconds = (dates - dates.astype("datetime64[D]")).astype(np.int64)
    days = dates.astype("datetime64[D]")
    month_start = days.astype("datetime64[M]").astype("datetime64[D]")
    year_start = days.astype("datetime64[Y]").astype("datetime64[D]")
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    yearday = (days - year_start).astype(np.int64) + 1
    # ISO week number (pandas' isocalendar().week): the week containing the year's first Thursday is 1.
    thursday = days + (3 - weekday).astype("timedelta64[D]")
    iso_week = (thursday - thursday.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) // 7 + 1
    fields = {
        "second": (seconds % 60) / 59.0, "minute": (seconds // 60 % 60) / 59.0, "hour": (seconds // 3600) / 23.0,
        "weekday": weekday / 6.0, "monthday": (days - month_start).astype(np.int64) / 30.0,
        "yearday": (yearday - 1) / 365.0, "yearweek": (iso_week - 1) / 52.0,
        "month": ((days.astype("datetime64[M]").astype(np.int64) % 12)) / 11.0,
    }
    return np.stack([fields[f] - 0.5 for f in _TIME_FEATURES[freq]], -1).astype(np.float64)


def infer_freq(dates: np.ndarray | None) -> str | None:
    """``'h'``, ``'t'``, ``'d'`` ... from the median step between dates (``None`` without dates)."""
    if dates is None or len(dates) < 2:
        return None
    step = float(np.median(np.diff(np.asarray(dates, "datetime64[s]")).astype(np.int64)))
    for limit, freq in ((1, "s"), (3599, "t"), (86399, "h"), (7 * 86400 - 1, "d"), (28 * 86400 - 1, "w")):
        if step <= limit:
            return freq
    return "m"


@dataclass(frozen=True)
class ForecastData:
    """A data set prepared for one look-back: scaled rows of the whole series, the split,
    the scaler, optional time features (``[n, F]`` or ``None``) and the source."""

    series: SeriesData
    scaled: np.ndarray
    splits: Splits
    scaler: StandardScaler
    marks: np.ndarray | None
    seq_len: int

    @property
    def n_channels(self) -> int:
        return self.scaled.shape[1]

    def part(self, split: str) -> tuple[int, int]:
        return getattr(self.splits, split)

    def starts(self, split: str, horizon: int) -> np.ndarray:
        """Absolute row index of every window start of ``split`` (``num_windows`` of them)."""
        b1, b2 = self.part(split)
        count = num_windows(b2 - b1, self.seq_len, horizon)
        if count < 1:
            raise ValueError(f"{self.series.path}: row {b2 + 1}: the {split} part has {b2 - b1} rows, too few for "
                             f"seq_len {self.seq_len} + horizon {horizon}")
        return b1 + np.arange(count)

    def windows(self, split: str, horizon: int):
        """``(x [w, L, C], y [w, H, C])`` of every window of ``split``."""
        b1, b2 = self.part(split)
        self.starts(split, horizon)  # the too-few-rows check
        return windows(self.scaled[b1:b2], self.seq_len, horizon)


def prepare(series: SeriesData, seq_len: int, horizon: int = 0, freq: str | None = None) -> ForecastData:
    """Split ``series`` for look-back ``seq_len``, fit the scaler on the train rows only,
    scale everything, and compute time features when the series has dates. Checks that
    every part has at least one window of ``seq_len + horizon`` rows."""
    path = series.path
    n = len(series.values)
    if n < seq_len + horizon:
        raise ValueError(f"{path}: row {n + 1}: too few rows ({n}) for seq_len {seq_len} + horizon {horizon}")
    try:
        splits = split_borders(series.name, n, seq_len)
    except ValueError as err:
        raise ValueError(f"{path}: row {n + 1}: {err}") from None
    train = series.values[splits.train[0]:splits.train[1]]
    scaler = StandardScaler.fit(train)
    freq = freq or infer_freq(series.dates)
    marks = None if series.dates is None else time_features(series.dates, freq)
    data = ForecastData(series, scaler.transform(series.values), splits, scaler, marks, seq_len)
    for split in ("train", "val", "test"):
        data.starts(split, max(horizon, 1))
    return data
