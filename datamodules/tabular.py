"""Tabular datamodules: scikit-learn's breast cancer and wine sets (offline) and your own CSV file.

Items are ``{"features": (F,) float, "label": long, "index": long}`` with the *raw* feature values;
the per-feature mean and std fitted on the training split only are in :attr:`data_info`, and every
interpzoo network standardises its own input with them (as image networks normalise theirs), so a
bundle takes raw rows. Splits are stratified and deterministic: ``test_fraction`` of all rows is
held out for test, then ``val_fraction`` of the rest for validation (the SENN reference's
"10% test, then 10% of the rest").
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from interpzoo.datamodules.base import BaseDataModule, DataError
from interpzoo.utils import did_you_mean

MISSING_TOKENS = {"", "na", "nan", "n/a", "null", "none", "?"}
# field separators a CSV file may use instead of the configured one (data.delimiter)
OTHER_DELIMITERS = (";", "\t", "|", ",")
FEATURE_TRANSFORMS = ("sqrt", "log1p", "log")


class TabularDataset(Dataset):
    """Rows in memory. Items: ``{"features": (F,) float32, "label": long, "index": long}``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected features (N, F) and labels (N,), got {tuple(features.shape)}, {tuple(labels.shape)}"
            )
        self.features = features.float()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {
            "features": self.features[idx],
            "label": self.labels[idx],
            "index": torch.tensor(idx, dtype=torch.long),
        }


def stratified_three_way(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """``(train, val, test)`` sorted indices; stratified when every class has enough rows."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"need 0 < test_fraction < 1 and 0 <= val_fraction < 1, got {test_fraction}, {val_fraction}"
        )

    def split(idx: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
        try:
            return train_test_split(idx, test_size=frac, stratify=labels[idx], random_state=seed)
        except ValueError:  # a class too small to stratify: plain seeded split
            return train_test_split(idx, test_size=frac, random_state=seed)

    rest, test = split(np.arange(len(labels)), test_fraction)
    if val_fraction == 0.0:
        return sorted(rest.tolist()), [], sorted(test.tolist())
    train, val = split(rest, val_fraction)
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


class TabularDataModule(BaseDataModule):
    """Base of the tabular datamodules; subclasses implement :meth:`load_arrays`.

    Args:
        test_fraction: share of all rows held out for test.
        val_fraction: share of the remaining rows held out for validation.
        standardize: put the train-split mean/std in :attr:`data_info` (the network standardises
            with them); ``False`` gives mean 0 and std 1 (raw features).
        batch_size, num_workers, pin_memory, seed: see :class:`BaseDataModule`; ``seed`` fixes the split.
    """

    def __init__(
        self,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        standardize: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed)
        self.test_fraction = test_fraction
        self.standardize = standardize
        self.feature_names: list[str] = []
        self.class_names: list[str] = []
        self.split_indices: dict[str, list[int]] = {}
        self._mean: list[float] = []
        self._std: list[float] = []

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """``(X (N, F) float, y (N,) int in [0, C), feature_names, class_names)``."""
        raise NotImplementedError

    def _build(self) -> None:
        x, y, self.feature_names, self.class_names = self.load_arrays()
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(y):
            raise DataError(
                f"{type(self).__name__}: expected X (N, F) and y (N,), got {x.shape} and {y.shape}"
            )
        if not np.isfinite(x).all():
            raise DataError(f"{type(self).__name__}: features contain NaN or inf; clean or drop those rows")
        if len(self.feature_names) != x.shape[1]:
            raise DataError(f"{len(self.feature_names)} feature names for {x.shape[1]} features")
        train, val, test = stratified_three_way(y, self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        if self.standardize:
            # Fitted on the training rows only: validation and test rows must not leak into it.
            mean = x[train].mean(axis=0)
            std = x[train].std(axis=0)
            std[~(std > 1e-12)] = 1.0  # constant column: leave it centred, not divided by 0
        else:
            mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
        self._mean, self._std = [float(v) for v in mean], [float(v) for v in std]
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

        def subset(idx: list[int]) -> TabularDataset:
            return TabularDataset(xt[idx], yt[idx])

        self.train_set = subset(train)
        self.push_set = self.train_set
        self.val_set = subset(val)
        self.test_set = subset(test)

    @property
    def data_info(self) -> dict[str, Any]:
        self.setup()
        return {
            "task": "classification",
            "input_kind": "tabular",
            "num_classes": len(self.class_names),
            "num_features": len(self.feature_names),
            "in_chans": None,
            "image_size": None,
            "mean": list(self._mean),
            "std": list(self._std),
            "class_names": list(self.class_names),
            "feature_names": list(self.feature_names),
            "concept_names": None,
            "part_names": None,
        }


class BreastCancerDataModule(TabularDataModule):
    """scikit-learn's copy of the UCI Wisconsin diagnostic breast cancer set: 569 x 30, classes
    ``malignant`` (0) and ``benign`` (1). Ships with scikit-learn (offline)."""

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        from sklearn.datasets import load_breast_cancer

        b = load_breast_cancer()
        return b.data, b.target, [str(n) for n in b.feature_names], [str(n) for n in b.target_names]


class WineDataModule(TabularDataModule):
    """scikit-learn's copy of the UCI wine set: 178 x 13, 3 cultivars. Ships with scikit-learn."""

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        from sklearn.datasets import load_wine

        w = load_wine()
        return w.data, w.target, [str(n) for n in w.feature_names], [str(n) for n in w.target_names]


def _is_missing(v: str) -> bool:
    return v.strip().lower() in MISSING_TOKENS


def _as_float(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def drop_conflicting_rows(x: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
    """Boolean keep-mask dropping the minority rows among identical feature vectors.

    For each group of rows with the same features, if the majority label holds at least
    ``0.5 + delta`` of the group, rows with another label are dropped; groups closer to a tie are
    kept whole (the SENN reference's ``find_conflicting`` with ``consensus_delta``, generalised
    from binary labels).
    """
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, row in enumerate(np.ascontiguousarray(x)):
        groups[row.tobytes()].append(i)
    keep = np.ones(len(y), dtype=bool)
    for rows in groups.values():
        if len(rows) < 2:
            continue
        label, count = Counter(y[rows].tolist()).most_common(1)[0]
        if count / len(rows) >= 0.5 + delta:
            for i in rows:
                keep[i] = y[i] == label
    return keep


class CSVDataModule(TabularDataModule):
    """Your own table: a CSV file with a header row, one column being the class label.

    Numeric columns are used as they are, non-numeric ones are one-hot encoded (``col=value``
    features) or rejected, rows with missing values are dropped or rejected. Feature names are the
    column names, so explanations name your columns.

    Args:
        path: the CSV file.
        target: the label column. Integer-valued labels keep their numeric order; text labels are
            sorted alphabetically (``data_info["class_names"]`` has the mapping).
        features: columns to use (default: all but ``target`` and ``drop``).
        drop: columns to leave out (ids, leaky columns).
        categorical: ``onehot`` or ``error`` for non-numeric feature columns.
        missing: ``drop`` rows with a missing value (``""``, ``NA``, ``?``, ...) or ``error``.
        feature_transforms: ``{column: "sqrt"|"log1p"|"log"}`` applied before standardisation
            (COMPAS: ``{Number_of_Priors: sqrt}``).
        drop_conflicting: if set, :func:`drop_conflicting_rows` with this ``delta`` (COMPAS: 0.2).
        delimiter: field separator, one character (``tab`` or ``\\t`` for a tab, which a command line cannot pass).
        test_fraction, val_fraction, standardize, batch_size, num_workers, pin_memory, seed: see
            :class:`TabularDataModule`.
    """

    def __init__(
        self,
        path: str | None = None,
        target: str | None = None,
        features: Sequence[str] | None = None,
        drop: Sequence[str] | None = None,
        categorical: str = "onehot",
        missing: str = "drop",
        feature_transforms: dict[str, str] | None = None,
        drop_conflicting: float | None = None,
        delimiter: str = ",",
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        standardize: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(test_fraction, val_fraction, standardize, batch_size, num_workers, pin_memory, seed)
        if not path or not target:
            raise DataError(
                "data=csv needs a file and its label column: python train.py data=csv path=/my/table.csv target=<column> "
                "(or data.path=... data.target=...)"
            )
        if categorical not in ("onehot", "error"):
            raise ValueError(f"categorical must be 'onehot' or 'error', got {categorical!r}")
        if missing not in ("drop", "error"):
            raise ValueError(f"missing must be 'drop' or 'error', got {missing!r}")
        for col, t in (feature_transforms or {}).items():
            if t not in FEATURE_TRANSFORMS:
                raise ValueError(f"feature_transforms[{col!r}]={t!r}: choose one of {FEATURE_TRANSFORMS}")
        self.path = Path(path)
        self.target = target
        self.features = None if features is None else list(features)
        self.drop = list(drop or [])
        self.categorical = categorical
        self.missing = missing
        self.feature_transforms = dict(feature_transforms or {})
        self.drop_conflicting = drop_conflicting
        delimiter = "\t" if delimiter in ("tab", "\\t") else delimiter  # the command line cannot pass a tab
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise DataError(
                f"data.delimiter={delimiter!r}: one character, e.g. ',' or ';' ('data.delimiter=\";\"' in a "
                "shell), or tab"
            )
        self.delimiter = delimiter

    def _read(self) -> tuple[list[str], list[list[str]]]:
        if self.path.is_dir():
            raise DataError(
                f"data.path={self.path} is a folder; give the CSV file: path=/absolute/path/to/file.csv"
            )
        if not self.path.is_file():
            raise DataError(f"CSV file not found: {self.path}; pass path=/absolute/path/to/file.csv")
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=self.delimiter)
                numbered = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.path} is not UTF-8 text (byte {e.start}: {e.reason}); save the table as UTF-8 CSV "
                "(a spreadsheet's 'CSV UTF-8' export), or it is not a text table at all"
            ) from None
        except csv.Error as e:
            raise DataError(
                f"{self.path} is not a readable CSV table ({e}); check the file and data.delimiter"
            ) from None
        numbered = [(n, r) for n, r in numbered if any(c.strip() for c in r)]
        rows = [r for _, r in numbered]
        # the file's line number of every data row (blank lines skipped), for error messages
        self._line_numbers = [n for n, _ in numbered[1:]]
        if len(rows) < 2:
            raise DataError(f"{self.path} has no data rows (expected a header row, then one row per sample)")
        header = [h.strip() for h in rows[0]]
        self._check_delimiter(header)
        bad = [self._line_numbers[i] for i, r in enumerate(rows[1:]) if len(r) != len(header)]
        if bad:
            raise DataError(
                f"{self.path}: rows {bad[:5]} have a different number of fields than the header ({len(header)}); "
                f"is the delimiter {self.delimiter!r} right? (set data.delimiter)"
            )
        return header, rows[1:]

    def _check_delimiter(self, header: list[str]) -> None:
        """A header read as one field (or fewer fields than a column list) that another separator splits."""
        wanted = [self.target, *(self.features or []), *self.drop]
        if all(name in header for name in wanted):
            return
        for other in OTHER_DELIMITERS:
            if other == self.delimiter:
                continue
            fields = [h.strip() for cell in header for h in cell.split(other)]
            if len(fields) > len(header) and self.target in fields:
                # as typed in a shell: Hydra needs ; , | quoted, and takes `tab` for a tab
                typed = "data.delimiter=tab" if other == "\t" else f"'data.delimiter=\"{other}\"'"
                raise DataError(
                    f"{self.path} looks separated by {other!r}, not by {self.delimiter!r} (data.delimiter): its "
                    f"header splits into {fields[:6]}{'...' if len(fields) > 6 else ''}; set {typed}"
                )

    def _numeric_column(self, name: str, values: list[str], line_numbers: list[int]) -> np.ndarray | None:
        """The column as floats, ``None`` if it is text; a mostly-numeric column with a bad cell is an error."""
        parsed = []
        for v in values:
            try:
                parsed.append(float(v))
            except ValueError:
                parsed.append(None)
        numbers = [p for p in parsed if p is not None]
        if len(numbers) == len(values) and all(math.isfinite(p) for p in numbers):
            return np.array(numbers, dtype=np.float64)
        # Mostly numbers: a typo or an overflow, not a categorical column (one-hot encoding would turn the
        # column into an indicator per distinct value and train on garbage without a word).
        if len(numbers) < 0.5 * len(values):
            return None
        i = next(i for i, p in enumerate(parsed) if p is None or not math.isfinite(p))
        bad = [j for j, p in enumerate(parsed) if p is None or not math.isfinite(p)]
        more = f" ({len(bad) - 1} more such cells)" if len(bad) > 1 else ""
        what = "an infinite number" if parsed[i] is not None and not math.isnan(parsed[i]) else "not a number"
        raise DataError(
            f"{self.path}, line {line_numbers[i]}, column {name!r}: {values[i]!r} is {what} in a numeric column{more}. "
            f"Fix the cell, or leave it empty so that data.missing=drop drops the row, or leave the column out "
            f"with data.drop=[{name}]"
        )

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        header, rows = self._read()
        for name in [self.target, *(self.features or []), *self.drop, *self.feature_transforms]:
            if name not in header:
                raise DataError(
                    f"{self.path} has no column {name!r}{did_you_mean(name, header)}; columns: {header}"
                )
        used = (
            self.features
            if self.features is not None
            else [h for h in header if h != self.target and h not in self.drop]
        )
        if self.target in used:
            raise DataError(f"the target column {self.target!r} cannot also be a feature")
        if not used:
            raise DataError(f"{self.path}: no feature columns left after removing the target and data.drop")
        cols = {h: i for i, h in enumerate(header)}
        needed = [self.target, *used]
        line_numbers = list(self._line_numbers)
        incomplete = [r for r, row in enumerate(rows) if any(_is_missing(row[cols[c]]) for c in needed)]
        if incomplete:
            if self.missing == "error":
                row = rows[incomplete[0]]
                col = next(c for c in needed if _is_missing(row[cols[c]]))
                raise DataError(
                    f"{self.path}: {len(incomplete)} rows have missing values (first: line {line_numbers[incomplete[0]]}, column "
                    f"{col!r}); set data.missing=drop to drop them"
                )
            warnings.warn(f"{self.path}: dropped {len(incomplete)} rows with missing values", stacklevel=2)
            skip = set(incomplete)
            line_numbers = [n for r, n in enumerate(line_numbers) if r not in skip]
            rows = [row for r, row in enumerate(rows) if r not in skip]
        if not rows:
            raise DataError(f"{self.path}: no complete rows")

        # Labels: numeric order when integer-valued, else alphabetical.
        raw_y = [row[cols[self.target]].strip() for row in rows]
        num_y = [_as_float(v) for v in raw_y]
        if all(v is not None and float(v).is_integer() for v in num_y):
            classes = sorted({int(v) for v in num_y})  # type: ignore[arg-type]
            lookup = {c: i for i, c in enumerate(classes)}
            y = np.array([lookup[int(v)] for v in num_y])  # type: ignore[arg-type]
            class_names = [str(c) for c in classes]
        else:
            classes_s = sorted(set(raw_y))
            lookup_s = {c: i for i, c in enumerate(classes_s)}
            y = np.array([lookup_s[v] for v in raw_y])
            class_names = classes_s
        if len(class_names) < 2:
            raise DataError(
                f"target column {self.target!r} has a single value; a classifier needs >= 2 classes"
            )
        if len(class_names) > 0.5 * len(rows):
            raise DataError(
                f"target column {self.target!r} has {len(class_names)} distinct values for {len(rows)} rows: it looks "
                "continuous; interpzoo trains classifiers (bin it into classes first)"
            )

        columns: list[np.ndarray] = []
        names: list[str] = []
        for c in used:
            values = [row[cols[c]].strip() for row in rows]
            nums = [_as_float(v) for v in values]
            numeric = self._numeric_column(c, values, line_numbers)
            if numeric is not None:
                col = numeric
                t = self.feature_transforms.get(c)
                if t in ("sqrt", "log") and (col < (0 if t == "sqrt" else 1e-300)).any():
                    raise DataError(
                        f"feature_transforms[{c!r}]={t!r} needs {'non-negative' if t == 'sqrt' else 'positive'} values"
                    )
                if t == "sqrt":
                    col = np.sqrt(col)
                elif t == "log1p":
                    col = np.log1p(col)
                elif t == "log":
                    col = np.log(col)
                columns.append(col)
                names.append(c)
                continue
            if c in self.feature_transforms:
                raise DataError(f"feature_transforms[{c!r}]: column {c!r} is not numeric")
            if self.categorical == "error":
                example = next(v for v, n in zip(values, nums) if n is None)
                raise DataError(
                    f"column {c!r} is not numeric (e.g. {example!r}); set data.categorical=onehot, or leave it out "
                    f"with data.drop=[{c}]"
                )
            for level in sorted(set(values)):
                columns.append(np.array([v == level for v in values], dtype=np.float64))
                names.append(f"{c}={level}")
        x = np.stack(columns, axis=1)
        if self.drop_conflicting is not None:
            keep = drop_conflicting_rows(x, y, float(self.drop_conflicting))
            x, y = x[keep], y[keep]
        return x, y, names, class_names
