"""ImageFolder classification with DDP, in the shape of torchvision's references/classification/train.py.

    torchrun --nproc_per_node 2 examples/torchvision_ddp.py --data /work/shared/data/imagenet-sample/val
    torchrun --nproc_per_node 2 examples/torchvision_ddp.py --data DIR --expsgd     # the exponential-LR twin

`--expsgd` changes one line, the optimizer's: `ExpSGD.for_model` replaces `torch.optim.SGD(model.parameters(), ...)`
with its exact twin (the scale-invariant weights trained without weight decay on the exponential LR); the
scheduler, the loop, DDP and the checkpoints are the same. `--float64 --bn-eps 1e-12 --dump F` exist for the
equivalence test (tests/test_examples.py): in float64 with a tiny BN eps both runs end with the same function.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torchvision import transforms as T

from bigexp.optim import ExpSGD


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/work/shared/data/imagenet-sample/val", help="an ImageFolder directory")
    p.add_argument("--model", default="resnet18", help="any torchvision classification model name")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="images per process per step")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    p.add_argument("--lr-step-size", type=int, default=1, help="StepLR: decay every this many epochs")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--lr-warmup-epochs", type=int, default=0, help="linear warm-up (SequentialLR) before StepLR")
    p.add_argument("--res", type=int, default=64, help="train crop size (px)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expsgd", action="store_true", help="train the exponential-LR twin (ExpSGD.for_model)")
    p.add_argument("--float64", action="store_true", help="model and inputs in float64 (equivalence tests)")
    p.add_argument("--bn-eps", type=float, default=None, help="override every BatchNorm's eps")
    p.add_argument("--dump", default="", help="write final weights and train-mode logits here (rank suffix)")
    return p.parse_args()


def main():
    args = get_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    dtype = torch.float64 if args.float64 else torch.float32
    torch.manual_seed(args.seed)

    tf = T.Compose([T.RandomResizedCrop(args.res), T.RandomHorizontalFlip(), T.PILToTensor(),
                    T.ConvertImageDtype(dtype), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = torchvision.datasets.ImageFolder(args.data, tf)
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(args.limit))
    sampler = (torch.utils.data.DistributedSampler(dataset, seed=args.seed) if distributed
               else torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True)

    model = torchvision.models.get_model(args.model, weights=None, num_classes=1000).to(device, dtype)
    for m in model.modules():
        if args.bn_eps is not None and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = args.bn_eps
    model_without_ddp = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                    else None)
    criterion = nn.CrossEntropyLoss()

    if args.expsgd:   # the one line that differs: noise is enough for the invariance check's example batch
        example = torch.randn(8, 3, args.res, args.res, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        optimizer = ExpSGD.for_model(model_without_ddp, example, lr=args.lr, momentum=args.momentum,
                                     weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    if args.lr_warmup_epochs:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=args.lr_warmup_epochs)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, scheduler],
                                                          milestones=[args.lr_warmup_epochs])
    if rank == 0 and args.expsgd:
        print(next(ln for ln in optimizer.invariance_report.format().splitlines() if "invariant params in" in ln))

    for epoch in range(args.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        model.train()
        for i, (image, target) in enumerate(loader):
            image, target = image.to(device), target.to(device)
            loss = criterion(model(image), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.4g}")

    if args.dump:
        probe = torch.randn(4, 3, args.res, args.res, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        with torch.no_grad():
            logits = model_without_ddp.train()(probe)   # train mode: the function the equivalence is about
        torch.save({"state": model_without_ddp.state_dict(), "logits": logits.cpu()}, f"{args.dump}.rank{rank}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
