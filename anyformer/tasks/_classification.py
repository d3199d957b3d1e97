"""What the classification tasks share: batched prediction over a held-out set split across
processes, the held-out metrics beside the majority-class baseline, and their predictions for
user inputs (`anyformer classify` / `predict`: every label with its probability)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import mean_across, split_evenly
from ..dtypes import DTYPES
from .base import Setting, Task


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


class Classifier(Task):
    """A task whose model maps one input to class logits (b, classes): it reads a user input
    into a model input (`read_input`) and names its classes (`class_names`); predictions list
    every class with its probability, most likely first."""

    commands = ("classify",)
    predict_settings: ClassVar[dict[str, Setting]] = {"top": Setting(int, 0, "print only the most likely N labels (0: all)")}

    def class_names(self) -> list[str]:
        """The names of the classes, in label order."""
        raise NotImplementedError

    def read_input(self, text: str, tokenizer: Any, settings: dict[str, Any]) -> Tensor:
        """One user input (a text, or the path of a file) as a model input batch of one."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        """Cross-entropy of the class logits of a batch (model inputs..., labels), the forward
        under autocast to `dtype`, the loss in fp32."""
        *inputs, labels = batch
        with torch.autocast(inputs[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(*inputs)  # (b, classes)
        return F.cross_entropy(logits.float(), labels)

    def inspect_input(self, text: str, tokenizer: Any) -> tuple[Tensor, list[str] | None]:
        """The model input `read_input` makes of `text`, at the default settings."""
        return self.read_input(text, tokenizer, {name: s.default for name, s in self.predict_settings.items()}), None

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        if settings["top"] < 0:
            raise ValueError(f"top must be at least 0 (0: every label), got {settings['top']}")
        names = self.class_names()
        device = next(model.parameters()).device
        width = max(len(n) for n in names) + 2
        for text in inputs:
            x = self.read_input(text, tokenizer, settings).to(device)
            with torch.no_grad():
                probs = model(x).float().softmax(-1)[0]  # (classes,)
            if len(inputs) > 1:
                yield f"== {text}"
            for i in probs.argsort(descending=True).tolist()[: settings["top"] or None]:
                yield f"{names[i]:<{width}} {float(probs[i]):.3f}"
