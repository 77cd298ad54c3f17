"""A user's own DeepSpeed script: a small BatchNorm CNN on Fashion-MNIST (the idx files, no download).

    torchrun --nproc_per_node 2 examples/deepspeed_train.py                      # torch SGD, momentum, weight decay
    torchrun --nproc_per_node 2 examples/deepspeed_train.py --expsgd --zero 1    # the exponential-LR twin

`--expsgd` changes the optimizer line (`ExpSGD.for_model` instead of `torch.optim.SGD(model.parameters(), ...)`);
`bigexp.optim.attach_deepspeed(engine, optimizer)` after `deepspeed.initialize` wires the group norms across ranks
when ZeRO shards the masters (for torch SGD it does nothing). `--dump F` writes the final weights and train-mode
logits for tests/test_examples.py. (No float64 mode: DeepSpeed
refuses float64 gradients under ZeRO 0 and keeps fp32 masters under ZeRO 1.)
"""
import argparse
import gzip
import os

import deepspeed
import numpy as np
import torch
import torch.nn as nn

from bigexp.optim import ExpSGD, attach_deepspeed


def read_idx(path):
    """An idx(.gz) file of Fashion-MNIST as a numpy array (big-endian header: magic, then one int per dim)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def net(bn_eps):
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, eps=bn_eps), nn.ReLU()]
    return nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--limit", type=int, default=0, help="first N training images only (0: all 60,000)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1])
    p.add_argument("--bn-eps", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expsgd", action="store_true", help="train the exponential-LR twin (ExpSGD.for_model)")
    p.add_argument("--dump", default="")
    return p.parse_args()


def main():
    args = get_args()
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29512")):
        os.environ.setdefault(k, v)   # plain `python examples/deepspeed_train.py` runs as one rank
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    images = read_idx(f"{args.data}/train-images-idx3-ubyte.gz")
    labels = read_idx(f"{args.data}/train-labels-idx1-ubyte.gz")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    x_all = (torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0 - 0.286) / 0.353
    y_all = torch.from_numpy(labels.astype(np.int64))

    torch.manual_seed(args.seed)
    model = net(args.bn_eps)
    if args.expsgd:   # the one line that differs
        optimizer = ExpSGD.for_model(model, x_all[:8], lr=args.lr, momentum=args.momentum,
                                     weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    config = {"train_batch_size": args.batch_size, "train_micro_batch_size_per_gpu": args.batch_size // world,
              "zero_optimization": {"stage": args.zero}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=config)
    attach_deepspeed(engine, optimizer)   # sharded masters: the group norms need every rank's shard

    gen = torch.Generator().manual_seed(args.seed)   # the same global order on every rank; each takes its slice
    micro = args.batch_size // world
    for step in range(args.steps):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)[rank * micro:(rank + 1) * micro]
        x, y = x_all[idx].to(engine.device), y_all[idx].to(engine.device)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()   # optimizer step, then the scheduler's (DeepSpeed steps it per optimizer step)
        if rank == 0 and step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    if args.dump:
        with torch.no_grad():
            logits = engine.module.train()(x_all[:64].to(engine.device))   # train mode, as in the theorem
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        torch.save({"state": state, "logits": logits.cpu()}, f"{args.dump}.rank{rank}")


if __name__ == "__main__":
    main()
