"""Atomic, self-checking checkpoints around DeepSpeed's save/load.

Layout: <run>/checkpoints/step000001234/ holds DeepSpeed's files for that step, one `rng_rank<r>.pt` per rank (its
RNG states and its module buffers) and a `manifest.json` (sizes and sha256 of every file, the model signature, world
size; for bigexp.run.drift the resolved config and the data files' recorded sha256). A checkpoint is written under
`.tmp-step…` and renamed into place only after every rank has finished and the manifest is on disk, so a kill at any
moment leaves the previous checkpoint loadable; a truncated or corrupt one fails its manifest check and is skipped
with a warning naming it. A save that runs out of space removes its partial files and stops the run (DiskFullError,
exit 4), the previous checkpoint untouched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bigexp.filehash import file_sha256
from bigexp.errors import CheckpointError, DiskFullError  # noqa: F401  (re-exported)
from bigexp.atomic import fsync_dir, write_text_atomic
from bigexp.run.distributed import DistContext
from bigexp.run.drift import check_resume_config, input_identity
from bigexp.run.faults import NO_FAULTS, Faults

MANIFEST = "manifest.json"
# torch.save's zip writer reports a short write without an errno ("unexpected pos ..."); a failed write that leaves
# less than this free on the device counts as the disk being full.
LOW_SPACE_BYTES = 64 * 2**20


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write into `directory` ran out of space: ENOSPC/EDQUOT anywhere in the exception's chain, or
    a RuntimeError (torch.save) with under LOW_SPACE_BYTES left."""
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return isinstance(exc, RuntimeError) and _free_bytes(directory) < LOW_SPACE_BYTES


def _check_model(path: Path, manifest: dict, signature: dict) -> None:
    if manifest.get("model") != signature:
        raise CheckpointError(
            f"{path}: written for a different model ({manifest.get('model')}); this run builds {signature}. "
            f"Point run.out_dir/run.name elsewhere or use --resume never.")


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _attempt(fn) -> Optional[BaseException]:
    """fn's exception (not raised: the caller first agrees with the other ranks), or None."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- handed back, re-raised by _stop_if_any_failed
        return exc
    return None


def model_signature(model: torch.nn.Module) -> dict:
    """What a checkpoint must match to be loadable into this model: parameter names and shapes."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"num_params": int(sum(p.numel() for p in model.parameters())), "shapes_sha": digest}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def verify_checkpoint(path: Path, *, deep: bool = True) -> dict:
    """Return the manifest if every file is present with its recorded size (and hash, when deep); else raise."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("size"), int)
                                              and isinstance(m.get("sha256"), str) for m in files.values()):
        raise CheckpointError(f"{mpath}: not a checkpoint manifest (expected files: {{name: {{size, sha256}}}})")
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {mpath})")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"{f}: size {f.stat().st_size} != {meta['size']} recorded (truncated?)")
        if deep and file_sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from the manifest (corrupt)")
    return manifest


class CheckpointManager:
    def __init__(self, root: Path, ctx: DistContext, keep: int = 3, faults: Faults = NO_FAULTS):
        self.root = Path(root)
        self.ctx = ctx
        self.keep = keep
        self.faults = faults

    @staticmethod
    def tag(global_step: int) -> str:
        return f"step{global_step:09d}"

    def list(self) -> list[Path]:
        """Finished checkpoints, newest first (by step in the name; temp dirs excluded)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step")]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def save(self, engine, client_state: dict, global_step: int, signature: dict) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory.

        Out of space (ENOSPC/EDQUOT, or torch.save's errno-less short write with the disk nearly full) on any rank:
        every rank stops together, the partial save is removed, the previous checkpoint is untouched, and every rank
        raises DiskFullError (exit 4). Always, not only at the last save: a run that went on training without
        checkpoints would lose more at the next kill than it gains, and `--resume auto` after freeing space
        continues from the previous checkpoint. Any other failure is re-raised on its rank, once all have agreed."""
        tag = self.tag(global_step)
        tmp_tag = f".tmp-{tag}"
        tmp = self.root / tmp_tag
        # Rank 0 makes the directory DeepSpeed writes into (a full disk can refuse even that); the flag exchange
        # is the barrier every rank waits at before writing.
        error = _attempt(lambda: _fresh_dir(tmp)) if self.ctx.is_main else None
        self._stop_if_any_failed(error, tmp, global_step)
        error = _attempt(lambda: engine.ds.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state,
                                                           save_latest=False))
        if error is not None:
            # DeepSpeed's save_checkpoint ends in a barrier that a rank failing inside it never reached (deepspeed
            # 0.19: engine.save_checkpoint); the ranks that did are waiting in it. Stand in for it.
            self.ctx.barrier()
        if error is None:
            error = _attempt(lambda: self._save_rank_state(engine, tmp))
        self._stop_if_any_failed(error, tmp, global_step)
        final = self.root / tag
        if self.ctx.is_main and self.faults.sleep_in_save_at_step == global_step:
            time.sleep(3600)  # test-only (bigexp.run.faults): held here, between the files and the manifest
        error = _attempt(lambda: self._publish(tmp, final, global_step, signature, client_state)) \
            if self.ctx.is_main else None
        self._stop_if_any_failed(error, tmp, global_step)
        return final

    def _save_rank_state(self, engine, tmp: Path) -> None:
        # DeepSpeed saves the module of rank 0 only, but BatchNorm running statistics are rank-local between the
        # end-of-epoch syncs (each rank normalises its own shard): without them a mid-epoch resume would hand rank
        # 0's statistics to every rank and the run would no longer be the uninterrupted one.
        local = {**rng_state(), "module_buffers": {n: b.detach().clone() for n, b in engine.ds.module.named_buffers()}}
        torch.save(local, tmp / f"rng_rank{self.ctx.rank}.pt")

    def _publish(self, tmp: Path, final: Path, global_step: int, signature: dict, client_state: dict) -> None:
        """Rank 0: the manifest, then the rename that makes the checkpoint exist, then the pruning."""
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
        manifest = {"global_step": global_step, "world_size": self.ctx.world_size, "model": signature,
                    "files": files, "config": client_state.get("config"),
                    "inputs": input_identity(client_state.get("config"))}
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # the same step saved again after a resume: replace it whole
            old = self.root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        for stale in self.list()[self.keep:]:
            shutil.rmtree(stale, ignore_errors=True)

    def _stop_if_any_failed(self, error: Optional[BaseException], tmp: Path, global_step: int) -> None:
        """Collective: whether any rank failed (and whether for space). If one did, rank 0 removes the partial save
        and every rank raises: the disk-full error where space ran out anywhere, else its own error or a note
        that another rank failed."""
        full = error is not None and is_disk_full(error, self.root)
        flags = torch.tensor([float(error is not None), float(full)], device=self.ctx.device)
        self.ctx.all_reduce_sum(flags)
        if flags[0] == 0:
            return
        message = None
        if self.ctx.is_main:
            partial = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.list()
            message = (f"no space left on the device of {self.root} while saving checkpoint {self.tag(global_step)}: "
                       f"{_free_bytes(self.root) / 2**20:.1f} MiB free after removing the partial save "
                       f"({partial / 2**20:.1f} MiB written). The previous checkpoint "
                       f"{'is intact: ' + str(previous[0]) if previous else 'does not exist (none saved yet)'}. "
                       f"Free space, then rerun with --resume auto")
        message = self.ctx.broadcast_object(message)
        if flags[1] > 0:
            raise DiskFullError(message) from error
        if error is not None:
            raise error
        raise CheckpointError(f"checkpoint {self.tag(global_step)} was not saved: another rank failed writing it "
                              f"(its error is in its log)")

    def find_resumable(self, spec: str) -> Path | None:
        """'auto': the newest checkpoint that passes its manifest check (warning for each one skipped);
        'never': None; anything else: that path, which must be valid."""
        if spec == "never":
            return None
        if spec != "auto":
            p = Path(spec)
            verify_checkpoint(p)
            return p
        chosen = None
        if self.ctx.is_main:
            self._clean_interrupted_saves()
            for p in self.list():
                try:
                    verify_checkpoint(p)
                    chosen = str(p)
                    break
                except CheckpointError as e:
                    warnings.warn(f"skipping checkpoint {p}: {e}")
        chosen = self.ctx.broadcast_object(chosen)
        return Path(chosen) if chosen else None

    def _clean_interrupted_saves(self) -> None:
        """Rank 0, before choosing: undo what a save killed midway left behind.

        `.old-<tag>` without `<tag>`: killed between the two renames of a re-save; the old copy was complete, so it
        goes back. `.tmp-*`: a save that never reached its rename; never loadable, removed to free the space.
        """
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".old-") and not (self.root / p.name[len(".old-"):]).exists():
                warnings.warn(f"restoring {p.name} to {p.name[len('.old-'):]} (a re-save was interrupted)")
                os.replace(p, self.root / p.name[len(".old-"):])
            elif p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                warnings.warn(f"removing {p} (left by an interrupted checkpoint save)")
                shutil.rmtree(p, ignore_errors=True)

    def check_config(self, path: Path, cfg, signature: dict) -> None:
        """Before loading: a checkpoint of another model is refused as such (CheckpointError), then a config that
        changes the trajectory (bigexp.run.drift: ConfigError unless accepted). Reads only the manifest, which
        holds the config it was written under (checkpoints older than that are not compared)."""
        path = Path(path)
        manifest = verify_checkpoint(path, deep=False)
        _check_model(path, manifest, signature)
        check_resume_config(self._manifest_dict(manifest, "config"), cfg, path, self._manifest_dict(manifest, "inputs"))

    @staticmethod
    def _manifest_dict(manifest: dict, key: str) -> dict:
        value = manifest.get(key)
        return value if isinstance(value, dict) else {}

    def load(self, engine, path: Path, signature: dict) -> dict:
        """Collective. Restores engine (weights, optimizer, scheduler) and this rank's RNG; returns client state."""
        path = Path(path)
        manifest = verify_checkpoint(path, deep=False)
        _check_model(path, manifest, signature)
        # another number of ranks: sharded optimizer state is cut anew (bigexp.run.reshard)
        load_path, client = engine.load_checkpoint(path, manifest.get("world_size"))
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load it")
        rng_file = path / f"rng_rank{self.ctx.rank}.pt"
        if rng_file.is_file():
            local = torch.load(rng_file, weights_only=False)
            set_rng_state(local)
            buffers = dict(engine.ds.module.named_buffers())
            with torch.no_grad():
                for name, value in local.get("module_buffers", {}).items():
                    if name in buffers:
                        buffers[name].copy_(value)
        return client or {}
