"""The Lightning module that trains any registered classifier on any task type."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from medlens.engine.network import ClassifierNet
from medlens.models.transfer import freeze_norm_statistics
from medlens.tasks import Task, get_task
from medlens.transforms.augment import BatchAugment, apply_mix, sample_mix


def monitor_mode(monitor: str) -> Literal["min", "max"]:
    """``"min"`` for a monitored loss (``val_loss``), ``"max"`` for a score (AUC, accuracy, QWK, Dice)."""
    return "min" if monitor.endswith("loss") else "max"


def outputs_to_probs(task: str | Task, logits: torch.Tensor) -> torch.Tensor:
    """The task's activation: (N,) positive-class probability for binary; (N, K) otherwise."""
    return get_task(task).activation(logits)


def validation_scores(task: str | Task, prob: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """What training monitors (the task's torchmetrics): ``val_auc`` (macro one-vs-rest; 0 when undefined),
    ``val_acc`` (the MedMNIST evaluator's: 0.5 / argmax, per-label for multilabel) and ``val_qwk`` for ordinal
    tasks. The reported metrics with CIs are ``medlens.evaluation``'s, computed after training."""
    out = get_task(task).validation_scores(prob, y)
    return {k: float(v) if torch.isfinite(torch.as_tensor(v)) else 0.0 for k, v in out.items()}


def train_accuracy(task: str | Task, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of a training batch (as augmented) at 0.5 / argmax: Keras's ``acc``, beside ``val_acc``."""
    task = get_task(task)
    return task.batch_accuracy(task.activation(logits), y)


def ema_update(decay: float):
    """The EMA step of ``AveragedModel``: ``ema <- d ema + (1 - d) w`` with ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so the average follows the weights closely at first instead of keeping the random
    initialisation for hundreds of steps."""

    def update(ema_params, params, num_averaged):
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        if ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        else:  # counters (BatchNorm's num_batches_tracked) are copied
            for e, p in zip(ema_params, params):
                e.copy_(p)

    return update


def progressive_size(cfg, epoch: int, full: tuple[int, ...]) -> tuple[int, ...] | None:
    """Progressive resizing: the training input size at ``epoch`` (None at full size). The size rises
    linearly from ``start x full`` at epoch 0 to full after ``fraction`` of the epochs; at least 8 voxels."""
    pr = cfg.progressive
    if pr is None:
        return None
    ramp = max(1, round(pr.fraction * cfg.epochs))
    if epoch >= ramp:
        return None
    s = pr.start + (1 - pr.start) * epoch / ramp
    size = tuple(max(8, int(round(s * n))) for n in full)
    return None if size == tuple(full) else size


class ClassifierModule(L.LightningModule):
    class_weights: torch.Tensor   # a buffer (register_buffer); empty without class weights

    def __init__(self, model: ClassifierNet, task: str, train_cfg, seed: int = 0,
                 class_weights: torch.Tensor | None = None, pos_weight: float | None = None) -> None:
        super().__init__()
        self.model, self.task, self.cfg, self.seed = model, task, train_cfg, seed
        self.task_type = get_task(task)  # activation, loss and validation scores
        self.augment = BatchAugment(train_cfg.augment)
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.empty(0))
        self.pos_weight = pos_weight
        self._val_out: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._gen = torch.Generator()
        # train.ema: an exponential moving average of the weights (BatchNorm statistics included) is what
        # validation sees, what the best checkpoint is chosen on and what is saved
        self.ema = None
        if train_cfg.ema:
            self.ema = AveragedModel(model, multi_avg_fn=ema_update(train_cfg.ema), use_buffers=True)
            self.ema.requires_grad_(False)

    def final_network(self) -> ClassifierNet:
        """The trained network: the EMA weights when ``train.ema`` is on, else the weights themselves."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        return self.model

    def train(self, mode: bool = True):
        """Train mode, except for frozen BatchNorm layers: their running statistics stay as loaded."""
        super().train(mode)
        if mode:
            freeze_norm_statistics(self.model)
        return self

    def on_train_start(self) -> None:
        # Lightning does not call train() before the first epoch (and restores each submodule's mode
        # after validation), so the frozen layers are put in eval mode here once.
        freeze_norm_statistics(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.class_weights if self.class_weights.numel() else None
        return self.task_type.loss(logits, y, class_weights=w, pos_weight=self.pos_weight,
                                   label_smoothing=self.cfg.label_smoothing)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Each step's randomness (dropout, augmentation) depends only on (seed, global step), never on
        # what else drew from the global RNG: a resumed run reproduces the uninterrupted one exactly.
        step_seed = self.seed * 1_000_003 + int(self.trainer.global_step)
        torch.manual_seed(step_seed)
        self._gen.manual_seed(step_seed + 7)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self.augment(x, self._gen)
        size = progressive_size(self.cfg, int(self.current_epoch), tuple(x.shape[2:]))
        if size is not None:  # train.progressive: early epochs on downsampled inputs
            x = F.interpolate(x, size=size, mode="area")
        mix = sample_mix(x.shape, self.cfg.mixup, self.cfg.cutmix, self._gen)
        if mix is not None:  # train.mixup / train.cutmix: the loss mixes the two targets in the images' share
            x = apply_mix(x, mix)
        logits = self(x)
        if mix is None:
            loss = self.loss(logits, y)
        else:
            loss = mix.lam * self.loss(logits, y) + (1 - mix.lam) * self.loss(logits, y[mix.perm])
            y = y if mix.lam >= 0.5 else y[mix.perm]
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        self.log(f"train_{self.task_type.train_metric}", train_accuracy(self.task_type, logits.detach(), y),
                 on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.ema(x) if self.ema is not None else self(x)
        self._val_out.append((logits.float().detach(), y))
        self.log("val_loss", self.loss(logits, y), on_step=False, on_epoch=True, batch_size=len(x))

    def on_validation_epoch_end(self) -> None:
        if not self._val_out:
            return
        logits = torch.cat([o[0] for o in self._val_out])
        y = torch.cat([o[1] for o in self._val_out]).numpy()
        self._val_out.clear()
        task = self.task_type
        for name, value in validation_scores(task, task.activation(logits), torch.as_tensor(y)).items():
            self.log(name, value)

    def configure_optimizers(self):
        c = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            momentum = 0.9 if c.momentum is None else c.momentum
            opt = torch.optim.SGD(params, lr=c.lr, momentum=momentum, weight_decay=c.weight_decay,
                                  nesterov=c.nesterov and momentum > 0)
        elif c.optimizer == "rmsprop":  # the Keras DICOM tutorial's optimiser (rho 0.9, no momentum by default)
            opt = torch.optim.RMSprop(params, lr=c.lr, alpha=c.rmsprop_alpha, momentum=c.momentum or 0.0,
                                      weight_decay=c.weight_decay)
        elif c.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.scheduler == "none":
            return opt
        if c.scheduler == "plateau":
            sch = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=monitor_mode(c.monitor), factor=0.5,
                                                             patience=3)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "monitor": c.monitor}}
        steps = self.trainer.estimated_stepping_batches
        warm = int(steps * c.warmup_epochs / max(c.epochs, 1))
        sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=max(int(steps), 1),
                                                  pct_start=max(warm / max(steps, 1), 0.02),
                                                  anneal_strategy="cos") if warm else \
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(steps), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}
