"""The training loop: mini-batches of padded sequences with their lengths, AdamW, cosine learning-rate
decay, early stopping on the validation loss with the best weights restored, checkpoints that let an
interrupted run continue exactly, and DistributedDataParallel when a process group is active."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import _distributed as D

HISTORY_KEYS = ("epoch", "loss", "acc", "val_loss", "val_acc", "lr", "seconds")


@dataclass
class Batches:
    """Padded cases ``x`` (N, T, F), their ``lengths`` (N,) and integer targets ``y`` (N,)."""

    x: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor, device: torch.device):
        lengths = self.lengths[idx]
        # trim the batch to its own longest case: padding beyond it is never read
        x = self.x[idx, : int(lengths.max())]
        return x.to(device, non_blocking=True), lengths, self.y[idx].to(device, non_blocking=True)


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: Optional[int]
    grad_clip: Optional[float]
    seed: int
    #: standard deviation of Gaussian noise added to the (standardized) training inputs each step
    noise: float = 0.0
    #: "loss": keep the weights of the lowest validation loss; "acc": the highest validation
    #: accuracy, ties to the lower validation loss
    monitor: str = "loss"


def evaluate(model: nn.Module, data: Batches, device: torch.device, loss_fn, batch_size: int = 512):
    """(summed loss, correct count, n) over ``data``, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            x, lengths, y = data.take(idx, device)
            logits = model(x, lengths)
            total += float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return total, correct, len(data)


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _better(score: tuple, best: tuple, eps: float = 1e-6) -> bool:
    for a, b in zip(score, best):
        if a < b - eps:
            return True
        if a > b + eps:
            return False
    return False


def train(
    model: nn.Module,
    train_data: Batches,
    val_data: Optional[Batches],
    cfg: TrainConfig,
    *,
    device: torch.device,
    class_weights: Optional[torch.Tensor] = None,
    progress: bool = False,
    resume_state: Optional[dict] = None,
    checkpoint: Optional[Callable[[dict], None]] = None,
    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
) -> dict:
    """Train ``model`` in place; returns the history (lists under :data:`HISTORY_KEYS`) plus
    ``best_epoch``. The model ends with the weights of the best validation loss (the last weights
    when there is no validation data).

    ``checkpoint(state)`` is called on rank 0 after every epoch with everything needed to continue
    (``resume_state``): model, optimizer, scheduler, epoch, best weights, early-stopping counter,
    history and RNG states.
    """
    world = D.world_size()
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    net = ddp if ddp is not None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs), eta_min=cfg.lr * 0.01)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights.to(device) if class_weights is not None else None)
    # the validation loss is unweighted so that it measures calibration of the actual predictions
    val_loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    # per-process batch so that the global batch matches a single process
    local_batch = max(1, cfg.batch_size // world)
    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            range(len(train_data)), num_replicas=world, rank=D.rank(), shuffle=True, seed=cfg.seed
        )

    history = {k: [] for k in HISTORY_KEYS}
    start_epoch, best_loss, best_epoch, bad_epochs = 0, (math.inf,), -1, 0
    best_state = None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch = int(resume_state["epoch"])
        best_loss = tuple(float(v) for v in resume_state["best_loss"])
        best_epoch = int(resume_state["best_epoch"])
        bad_epochs = int(resume_state["bad_epochs"])
        best_state = resume_state["best_model"]
        history = {k: list(resume_state["history"][k]) for k in HISTORY_KEYS}
        _set_rng_state(resume_state["rng"], gen)
        if resume_state.get("stopped"):
            start_epoch = cfg.epochs

    bar = None
    if progress and D.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="train", unit="epoch", file=sys.stderr, leave=True)
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            net.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), dtype=torch.long)
            else:
                order = torch.randperm(len(train_data), generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for start in range(0, len(order), local_batch):
                x, lengths, y = train_data.take(order[start : start + local_batch], device)
                if cfg.noise > 0:
                    x = x + cfg.noise * torch.randn(x.shape, generator=gen).to(device)
                logits = net(x, lengths)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
            scheduler.step()
            loss_sum, correct, seen = D.all_sum([loss_sum, correct, seen], device)
            row = {
                "epoch": epoch + 1,
                "loss": loss_sum / seen,
                "acc": correct / seen,
                "val_loss": None,
                "val_acc": None,
                "lr": optimizer.param_groups[0]["lr"],
            }
            if val_data is not None and len(val_data):
                # every rank holds the same weights and the whole validation set: same numbers
                vl, vc, vn = evaluate(model, val_data, device, val_loss_fn)
                row["val_loss"], row["val_acc"] = vl / vn, vc / vn
                # lexicographic score, lower is better
                score = (row["val_loss"],) if cfg.monitor == "loss" else (-row["val_acc"], row["val_loss"])
                if best_epoch < 0 or _better(score, best_loss):
                    best_loss, best_epoch, bad_epochs = score, epoch + 1, 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                else:
                    bad_epochs += 1
                stopped = cfg.patience is not None and bad_epochs >= cfg.patience
                stopped = D.broadcast_flag(stopped, device)
            row["seconds"] = time.perf_counter() - t0
            for k in HISTORY_KEYS:
                history[k].append(row[k])
            if bar is not None:
                post = {"loss": f"{row['loss']:.3f}", "acc": f"{row['acc']:.3f}"}
                if row["val_acc"] is not None:
                    post.update(val_loss=f"{row['val_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}")
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if checkpoint is not None and D.is_main():
                checkpoint(
                    {
                        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "best_loss": list(best_loss),
                        "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "best_model": best_state,
                        "history": history,
                        "rng": _rng_state(gen),
                        "stopped": stopped,
                    }
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, history)
            if stopped:
                break
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history["best_epoch"] = best_epoch if best_state is not None else len(history["epoch"])
    return history
