"""Offline datasets for the training CLI: MNIST-1D and scikit-learn's 8x8 digits.

Both are generated or shipped locally, so a run never touches the network.
Inputs come back channels-last and standardised with the training-set mean and
standard deviation, labels as ``int32``.

Example:
  >>> from xsam_optax.train.data import load_dataset
  >>> ds = load_dataset("digits")
  >>> ds.x_train.shape[1:], ds.num_classes
  ((8, 8, 1), 10)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DATASETS = ("mnist1d", "digits")

# A fixed split keeps test accuracy comparable between runs and machines.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


class Dataset(NamedTuple):
  """Arrays of one dataset, channels-last, already standardised."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def _standardise(x_train, x_test):
  mean = x_train.mean()
  std = x_train.std() + 1e-8
  return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_mnist1d() -> Dataset:
  """MNIST-1D (Greydanus, 2020): 4000/1000 sequences of length 40, 10 classes.

  Generated offline from the package's templates with its default arguments
  (``make_dataset(get_dataset_args())``, seed 42), so every run gets the same data.

  Example:
    >>> ds = load_mnist1d()
    >>> ds.x_train.shape
    (4000, 40, 1)
  """
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top

  # `get_dataset` would try to download a pickle; `make_dataset` builds it locally.
  raw = make_dataset(get_dataset_args())
  x_train, x_test = _standardise(np.asarray(raw["x"]), np.asarray(raw["x_test"]))
  return Dataset(
      name="mnist1d",
      x_train=x_train[..., None],
      y_train=np.asarray(raw["y"], np.int32),
      x_test=x_test[..., None],
      y_test=np.asarray(raw["y_test"], np.int32),
      num_classes=10,
  )


def load_digits() -> Dataset:
  """scikit-learn's 8x8 handwritten digits, 1797 images, fixed stratified split.

  Example:
    >>> ds = load_digits()
    >>> len(ds.x_train), len(ds.x_test)
    (1347, 450)
  """
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  bunch = sk_load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      bunch.images, bunch.target, test_size=DIGITS_TEST_FRACTION,
      random_state=DIGITS_SPLIT_SEED, stratify=bunch.target)
  x_train, x_test = _standardise(x_train, x_test)
  return Dataset(
      name="digits",
      x_train=x_train[..., None],
      y_train=y_train.astype(np.int32),
      x_test=x_test[..., None],
      y_test=y_test.astype(np.int32),
      num_classes=10,
  )


def load_dataset(name: str, *, train_size: int | None = None) -> Dataset:
  """Loads a dataset by name, optionally keeping only the first ``train_size`` examples.

  Args:
    name: one of ``DATASETS``.
    train_size: if given, truncate the training set (for quick tests).

  Returns:
    A :class:`Dataset`.

  Example:
    >>> load_dataset("digits", train_size=100).x_train.shape
    (100, 8, 8, 1)
  """
  loaders = {"mnist1d": load_mnist1d, "digits": load_digits}
  if name not in loaders:
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
  ds = loaders[name]()
  if train_size is not None:
    if train_size < 1:
      raise ValueError(f"train_size must be >= 1, got {train_size}")
    ds = ds._replace(x_train=ds.x_train[:train_size], y_train=ds.y_train[:train_size])
  return ds
