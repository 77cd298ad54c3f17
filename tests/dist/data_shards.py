"""Run under `torchrun --nproc_per_node 2` by tests/test_data_dist.py (gloo, CPU).

Every rank calls ensure_betons (rank 0 writes the .beton from a real ImageFolder - one file serves
as train and val set - the other rank waits for it by polling, no barrier), builds its train and val loaders, and records which
samples it saw per epoch. Labels identify samples (one image per class, sorted wnids). Rank 0
gathers everything over gloo and writes it as JSON to OUT_DIR/result.json for the test to judge.

usage: data_shards.py SRC_DIR OUT_DIR
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from bigexp.config.schema import DataConfig
from bigexp.data.loaders import build_train_loader, build_val_loader
from bigexp.data.ensure import ensure_betons


def main() -> int:
    src, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = DataConfig(dataset="imagenet", train_source=src, val_source=src,
                     train_beton=os.path.join(out, "sample.beton"), val_beton=os.path.join(out, "sample.beton"),
                     write_max_res=48, min_res=32, max_res=32, val_res=32, num_workers=1)
    t0 = time.time()
    info = ensure_betons(cfg, rank=rank, world_size=world, progress=False, poll_s=0.2)
    wrote = [os.path.basename(r.path) for r in info["written"]]
    t_write = time.time() - t0

    train = build_train_loader(cfg, batch_size=50, rank=rank, world_size=world, seed=11)
    epochs = {}
    for epoch in range(3):
        train.set_epoch(epoch)
        epochs[epoch] = torch.cat([y for _, y in train]).tolist()
    val = build_val_loader(cfg, batch_size=64, rank=rank, world_size=world)
    val_labels = torch.cat([y for _, y in val]).tolist()
    mine = {"rank": rank, "wrote": wrote, "write_s": t_write, "len": len(train), "epochs": epochs,
            "val": val_labels, "threads": torch.get_num_threads()}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(gathered, fh)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
