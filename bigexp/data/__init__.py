"""FFCV data pipeline: writing .beton files (`write`, `fmnist`) and the loaders built on them (`loaders`).

Names are imported lazily so `bigexp data --help` does not pay for torch / ffcv imports.
"""
import importlib

_EXPORTS = {
    "bigexp.data.write": ["DataError", "WriteResult", "check_beton", "classes_path_for", "ensure_betons",
                          "scan_imagefolder", "write_imagefolder"],
    "bigexp.data.fmnist": ["FMNIST_MEAN", "FMNIST_STD", "load_split", "read_idx", "write_fashion_mnist"],
    "bigexp.data.loaders": ["IMAGENET_MEAN", "IMAGENET_STD", "TrainLoader", "ValLoader", "build_train_loader",
                            "build_val_loader", "resolution_for_epoch", "train_epoch_indices", "val_indices"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'bigexp.data' has no attribute {name!r}")
