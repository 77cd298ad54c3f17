"""FFCV data pipeline: writing .beton files and the loaders built on them.

  beton.py        what every .beton shares: fields, the atomic writer that cannot hang, class list, check_beton
  integrity.py    the size/sha256 record beside each .beton and the checks against it (load, `bigexp data verify`)
  imagefolder.py  ImageFolder tree (ImageNet layout) -> .beton
  fmnist.py       Fashion-MNIST idx files -> .beton
  ensure.py       ensure_betons: the files a config needs, rank 0 writes, the others wait
  loaders.py      the FFCV train/val loaders (sharded, resumable order)     -- NOT imported here
  augment.py      seeded crop/flip inside FFCV's pipeline (used by loaders)  -- NOT imported here
  cli.py          `bigexp data ...`

Importing this package costs numpy only (ffcv is imported inside the writers, on first use), so `bigexp data
--help` stays fast. loaders imports torch at module level (4-7 s on a 2-core box), so it is left out: import it
as `from bigexp.data.loaders import build_train_loader`.
"""
from bigexp.data.beton import DataError, WriteResult, check_beton, classes_path_for, import_ffcv
from bigexp.data.ensure import ensure_betons
from bigexp.data.fmnist import FMNIST_MEAN, FMNIST_STD, load_split, read_idx, write_fashion_mnist
from bigexp.data.imagefolder import scan_imagefolder, write_imagefolder

__all__ = ["DataError", "WriteResult", "check_beton", "classes_path_for", "import_ffcv", "ensure_betons",
           "FMNIST_MEAN", "FMNIST_STD", "load_split", "read_idx", "write_fashion_mnist", "scan_imagefolder",
           "write_imagefolder"]
