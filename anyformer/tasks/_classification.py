"""What the classification tasks share: batched prediction over a held-out set split across
processes, and the held-out metrics beside the majority-class baseline."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import mean_across, split_evenly
from ..dtypes import DTYPES


@torch.no_grad()
def predict(model: nn.Module, inputs: Callable[[Tensor], Tensor], labels: Tensor, env: Any, dtype_name: str, batch: int,
            limit: int | None = None) -> tuple[Tensor, Tensor]:
    """(summed loss, predicted classes) of this process's share of the first `limit` examples;
    `inputs(indices)` builds the model input of the examples at `indices`."""
    n = len(labels) if limit is None else min(limit, len(labels))
    idx = torch.arange(n)[env.rank :: env.world]
    dtype = DTYPES[dtype_name]
    was_training = model.training
    model.eval()
    loss, preds = torch.zeros((), dtype=torch.float64, device=env.device), []
    for part in split_evenly(idx, n, batch, env):
        if not len(part):  # fewer items than processes
            continue
        x, y = inputs(part).to(env.device), labels[part].to(env.device)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        preds.append(logits.argmax(-1).cpu())
    model.train(was_training)
    return loss, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def held_out_metrics(loss: Tensor, preds: Tensor, labels: Tensor, train_labels: Tensor, env: Any, limit: int | None) -> dict[str, float]:
    """Loss and accuracy of this process's predictions `preds` of the first `limit` of `labels`,
    and the accuracy of always answering the training split's most frequent class, summed over
    every process."""

    n = len(labels) if limit is None else min(limit, len(labels))
    mine = labels[:n][env.rank :: env.world]
    majority = int(torch.bincount(train_labels).argmax())
    sums = torch.stack([loss.cpu(), (preds == mine).sum().double(), (mine == majority).sum().double(),
                        torch.tensor(float(len(mine)), dtype=torch.float64)]).to(env.device)
    sums = mean_across(sums, env)
    return {"val_loss": float(sums[0] / sums[3]), "accuracy": float(sums[1] / sums[3]), "majority_accuracy": float(sums[2] / sums[3])}
