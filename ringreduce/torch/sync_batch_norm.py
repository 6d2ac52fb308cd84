"""SyncBatchNorm (Horovod's name): batch normalisation with statistics over every rank's batch.

In training, each rank sums its batch (and the squares) per channel; one
allreduce of ``[sum, sum of squares, count]`` gives the global mean and
variance, so the result is that of a BatchNorm over the concatenation of all
ranks' batches (ranks may hold different batch sizes). The statistics are
built from differentiable torch ops and :func:`ringreduce.torch.allreduce`
(whose gradient is the allreduce of the gradient), so autograd gives the
gradient of the sum of every rank's loss, on CPU and CUDA alike, without
torch's CUDA-only batch-norm kernels. In eval mode with running statistics it
is a plain BatchNorm.

Example
-------
>>> import torch, ringreduce.torch as hvd
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), hvd.SyncBatchNorm(8), torch.nn.ReLU())
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .mpi_ops import Sum, allreduce

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation synchronised across ranks (Horovod's ``hvd.SyncBatchNorm``).

    Same arguments as ``torch.nn.BatchNorm2d`` (any input of 2 or more
    dimensions, channels in dimension 1), plus ``process_set`` to synchronise
    over a subset of ranks.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_set=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        # Sums in float32 at least, so half-precision inputs keep their statistics.
        acc = torch.promote_types(input.dtype, torch.float32)
        xs = input.to(acc)
        count = torch.full((1,), input.numel() // max(c, 1), dtype=acc, device=input.device)
        local = torch.cat([xs.sum(dims), (xs * xs).sum(dims), count])
        total = allreduce(local, op=Sum, name=None, process_set=self.process_set)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        shape = [1, c] + [1] * (input.dim() - 2)
        out = (xs - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape).to(acc) + self.bias.view(shape).to(acc)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean, var, n):
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (n / (n - 1)) if float(n) > 1 else var
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
