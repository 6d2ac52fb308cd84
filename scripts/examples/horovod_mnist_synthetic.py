"""Horovod's PyTorch MNIST example, on synthetic MNIST-shaped data, with one import switched.

This is the shape of Horovod's examples/pytorch/pytorch_mnist.py (argparse,
the same Net, DistributedSampler, LR scaled by size, DistributedOptimizer with
named_parameters / compression / backward_passes_per_step / op,
broadcast_parameters + broadcast_optimizer_state, metric averaging with
hvd.allreduce, hvd.join at the end). The only change a Horovod user makes is
the import line below. The data is synthetic (noisy 28x28 images, each class a
bright patch at its own place), so nothing is downloaded and the loss must fall.

Run::

    mpirun -np 2 python scripts/examples/horovod_mnist_synthetic.py --epochs 2

It prints "epoch E: train loss L, test loss T, accuracy A" on rank 0 and a
final "final test loss T accuracy A" line, and "rank R checksum C" per rank
(the parameters, identical on every rank).
"""
from __future__ import annotations

import argparse
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed

import ringreduce.torch as hvd  # was: import horovod.torch as hvd


class Net(nn.Module):
    """Horovod's MNIST net."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def synthetic_mnist(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """n noisy 1x28x28 images: class k is a bright 8x8 patch at one of 10 fixed places."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    for k in range(10):
        row, col = 2 + 8 * (k // 4), 2 + 8 * (k % 4) - (k // 8) * 4
        x[y == k, :, row:row + 8, col:col + 8] += 1.5
    return torch.utils.data.TensorDataset(x, y)


def metric_average(val, name):
    tensor = torch.tensor(val)
    avg_tensor = hvd.allreduce(tensor, name=name)
    return avg_tensor.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Horovod-style MNIST on synthetic data")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--test-batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--test-samples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fp16-allreduce", action="store_true", default=False)
    parser.add_argument("--use-adasum", action="store_true", default=False)
    parser.add_argument("--gradient-predivide-factor", type=float, default=1.0)
    parser.add_argument("--batches-per-allreduce", type=int, default=1)
    args = parser.parse_args(argv)

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    train_dataset = synthetic_mnist(args.train_samples, seed=1)
    test_dataset = synthetic_mnist(args.test_samples, seed=2)
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size,
                                               sampler=train_sampler)
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=args.test_batch_size,
                                              sampler=test_sampler)

    model = Net()
    lr_scaler = args.batches_per_allreduce * hvd.size() if not args.use_adasum else 1
    optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression,
                                         op=hvd.Adasum if args.use_adasum else hvd.Average,
                                         gradient_predivide_factor=args.gradient_predivide_factor,
                                         backward_passes_per_step=args.batches_per_allreduce)

    def train(epoch):
        model.train()
        train_sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for batch_idx, (data, target) in enumerate(train_loader):
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            total += loss.item()
            count += 1
        return metric_average(total / max(count, 1), "avg_train_loss")

    def test():
        model.eval()
        test_loss, test_accuracy = 0.0, 0.0
        with torch.no_grad():
            for data, target in test_loader:
                output = model(data)
                test_loss += F.nll_loss(output, target, reduction="sum").item()
                pred = output.argmax(dim=1, keepdim=True)
                test_accuracy += pred.eq(target.view_as(pred)).float().sum().item()
        test_loss /= len(test_sampler)
        test_accuracy /= len(test_sampler)
        return metric_average(test_loss, "avg_loss"), metric_average(test_accuracy, "avg_accuracy")

    first_test = test()
    if hvd.rank() == 0:
        print(f"initial test loss {first_test[0]:.4f} accuracy {first_test[1]:.4f}", flush=True)
    for epoch in range(1, args.epochs + 1):
        train_loss = train(epoch)
        test_loss, acc = test()
        if hvd.rank() == 0:
            print(f"epoch {epoch}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
                  f"accuracy {acc:.4f}", flush=True)
    hvd.join()
    if hvd.rank() == 0:
        print(f"final test loss {test_loss:.4f} accuracy {acc:.4f}", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    crc = zlib.crc32(flat.numpy().tobytes())
    print(f"rank {hvd.rank()} checksum {crc:08x}", flush=True)


if __name__ == "__main__":
    main()
