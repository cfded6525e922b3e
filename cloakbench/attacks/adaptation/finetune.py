"""Fine-tuning a white-box face extractor with PyTorch Lightning: the three adaptations of DESIGN §7.

One training loop serves all three (they differ in their data and in whether PGD perturbs each batch):

- the extractor is a copy of the recognizer's module, trained whole with Adam; its normalisation layers
  stay in eval mode (running statistics frozen: a few hundred photos of a handful of identities would
  otherwise overwrite statistics estimated on millions);
- the head is a cosine softmax classifier (unit-norm class weights, logits ``scale * cos``) initialised at
  the class centroids of the original embeddings, so training starts from a sensible classifier;
- the loss is cross-entropy plus ``anchor_weight`` times the mean cosine distance between the new
  embedding of each training image and the *original* model's embedding of its clean counterpart. For a
  cloaked photo that pulls its features back to where the clean photo's were — robust retraining in
  feature space — and for a clean photo it keeps the embedding where it was, which is what keeps clean
  accuracy (FaceCure fine-tunes on far more identities than a CPU run can afford; with 20 identities the
  features of identities it never saw drift: measured with PGD cloaks, 10 photos per identity, 19 public
  identities x 3, clean top-1 1.000 -> 0.958 at weight 1 (3 epochs), -> 0.972 at weight 3 (5 epochs); at
  weight 10 a 6-photo run lost more, not less: 8 points). ``anchor_weight: 0`` gives plain cross-entropy
  fine-tuning (not measured here);
- ``adversarial``: each batch is replaced by its PGD adversarial examples (L-inf ``epsilon``, random start,
  ``attack_steps`` signed steps on the cross-entropy of the current model), Madry et al. 2018.

Runs are seeded with ``seed_everything(seed, workers=True)`` and a seeded data order, and trained weights
are cached by a hash of (adaptation config, base weights, training data, seed): the same suite never
trains twice.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cloakbench.attacks.adaptation.base import (
    Adaptation,
    Adapted,
    CheckpointStore,
    TrainingData,
    TrainingSet,
    TrainReport,
    label_indices,
    require_white_box,
)
from cloakbench.attacks.recognizers.base import Recognizer, TorchRecognizer
from cloakbench.config import require, stable_hash, to_plain

log = logging.getLogger(__name__)

ADAPT_VERSION = 1  # bump when the training loop changes in a way the config does not capture


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    epochs: int = 5
    batch_size: int = 16  # measured on a 2-core CPU: forward+backward of SFace is fastest per image at 8-16
    lr: float = 1e-4  # Adam, extractor
    head_lr: float = 1e-2  # Adam, cosine head
    weight_decay: float = 0.0
    scale: float = 16.0  # logits = scale * cosine
    anchor_weight: float = 3.0  # see the module docstring for what was measured
    public_per_identity: int | None = 3  # adaptive/adversarial: photos per public identity used (None: all)
    epsilon: float = 8 / 255  # adversarial only: PGD budget (L-inf)
    attack_steps: int = 3  # adversarial only
    attack_step_size: float = 4 / 255  # adversarial only

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        require(self.lr > 0 and self.head_lr > 0, f"lr and head_lr must be positive, got {self.lr}, {self.head_lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.scale > 0, f"scale must be positive, got {self.scale}")
        require(self.anchor_weight >= 0, f"anchor_weight must be >= 0, got {self.anchor_weight}")
        require(
            self.public_per_identity is None or self.public_per_identity >= 1,
            f"public_per_identity must be >= 1 or null, got {self.public_per_identity}",
        )
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")
        require(self.attack_steps >= 1, f"attack_steps must be >= 1, got {self.attack_steps}")
        require(self.attack_step_size > 0, f"attack_step_size must be positive, got {self.attack_step_size}")


def data_digest(data: TrainingSet) -> str:
    """Content hash of a training set (pixels, labels, references)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.images.detach().cpu().numpy()).tobytes())
    h.update("\n".join(data.labels).encode("utf-8"))
    if data.references is not None:
        h.update(np.ascontiguousarray(data.references.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def _freeze_statistics(module: torch.nn.Module) -> None:
    module.eval()  # BatchNorm uses its running statistics, Dropout is off; gradients still flow


def _lightning() -> Any:
    import pytorch_lightning as pl

    return pl


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning announces devices and tips through logging and warnings; the library prints nothing."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            # on purpose: normalisation layers keep their running statistics (see the module docstring)
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _module_class() -> type:
    pl = _lightning()

    class FaceFineTuner(pl.LightningModule):  # type: ignore[misc,name-defined]
        """Extractor + cosine head; cross-entropy + anchor loss; optional PGD on every batch."""

        def __init__(
            self, recognizer: TorchRecognizer, centroids: torch.Tensor, config: FineTuneConfig, *,
            adversarial: bool, seed: int,
        ) -> None:  # fmt: skip
            super().__init__()
            self.preprocess_spec = recognizer  # preprocess() only reads the input spec
            self.backbone = copy.deepcopy(recognizer.module)
            for p in self.backbone.parameters():
                p.requires_grad_(True)
            self.head = torch.nn.Parameter(centroids.clone())
            self.config = config
            self.adversarial = adversarial
            self.attack_generator = torch.Generator().manual_seed(seed)
            self.history: list[dict[str, float]] = []
            self._epoch: list[tuple[float, float, int]] = []

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.backbone(self.preprocess_spec.preprocess(x)), dim=1)

        def logits(self, emb: torch.Tensor) -> torch.Tensor:
            return self.config.scale * emb @ F.normalize(self.head, dim=1).T

        def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """PGD (L-inf, random start) on the cross-entropy of the current model; parameters get no gradient."""
            cfg = self.config
            noise = torch.rand(x.shape, generator=self.attack_generator).to(x.device)
            adv = (x + (noise * 2 - 1) * cfg.epsilon).clamp(0, 1)
            for _ in range(cfg.attack_steps):
                adv.requires_grad_(True)
                loss = F.cross_entropy(self.logits(self.embed(adv)), y)
                (grad,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = adv + cfg.attack_step_size * grad.sign()
                    adv = (x + (adv - x).clamp(-cfg.epsilon, cfg.epsilon)).clamp(0, 1)
            return adv.detach()

        def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
            x, y, ref = batch
            if self.adversarial:
                x = self.perturb(x, y)
            emb = self.embed(x)
            logits = self.logits(emb)
            loss = F.cross_entropy(logits, y)
            if self.config.anchor_weight > 0:
                loss = loss + self.config.anchor_weight * (1 - (emb * ref).sum(dim=1)).mean()
            correct = float((logits.argmax(dim=1) == y).float().sum())
            self._epoch.append((float(loss.detach()) * x.shape[0], correct, x.shape[0]))
            return loss

        def on_train_epoch_start(self) -> None:
            _freeze_statistics(self.backbone)
            self._epoch = []

        def on_train_epoch_end(self) -> None:
            n = sum(e[2] for e in self._epoch)
            self.history.append(
                {"epoch": float(len(self.history)), "loss": sum(e[0] for e in self._epoch) / max(n, 1),
                 "train_accuracy": sum(e[1] for e in self._epoch) / max(n, 1)}
            )  # fmt: skip

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(
                [
                    {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": self.config.lr},
                    {"params": [self.head], "lr": self.config.head_lr},
                ],
                weight_decay=self.config.weight_decay,
            )

    return FaceFineTuner


class FineTune(Adaptation):
    """End-to-end, adaptive or adversarial fine-tuning (which one is set by ``training_data`` and ``adversarial``)."""

    def __init__(self, config: FineTuneConfig, *, name: str, training_data: TrainingData, adversarial: bool) -> None:
        self.config = config
        self.name = name
        self.training_data = training_data
        self.adversarial = adversarial

    def config_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "training_data": self.training_data.value, "adversarial": self.adversarial,
            "config": to_plain(self.config), "version": ADAPT_VERSION,
        }  # fmt: skip

    def checkpoint_key(self, recognizer: Recognizer, data: TrainingSet, seed: int) -> str:
        return stable_hash(
            ("adapt", self.config_dict(), recognizer.name, recognizer.weights_id, data_digest(data), seed), length=24
        )

    def adapt(
        self, recognizer: Recognizer, data: TrainingSet, *, seed: int, checkpoints: CheckpointStore | None = None,
        progress: bool = False,
    ) -> Adapted:  # fmt: skip
        rec = require_white_box(recognizer, self.name)
        pl = _lightning()
        cfg = self.config
        key = self.checkpoint_key(rec, data, seed)
        classes, y = label_indices(data.labels)
        references = data.references if data.references is not None else data.images
        ref_emb = rec.embed_batched(references)  # the original model's view of the clean counterparts
        centroids = torch.stack([F.normalize(ref_emb[y == c].mean(dim=0), dim=0) for c in range(len(classes))])

        module = _module_class()(rec, centroids, cfg, adversarial=self.adversarial, seed=seed)
        state = checkpoints.load(key) if checkpoints is not None else None
        cached = state is not None
        start = time.perf_counter()
        if state is not None:
            module.backbone.load_state_dict(
                {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
            )
            module.head.data.copy_(state["head"])
            history: tuple[dict[str, float], ...] = tuple(
                {"epoch": float(e), "loss": float(loss), "train_accuracy": float(acc)}
                for e, (loss, acc) in enumerate(state.get("history", torch.zeros(0, 2)).tolist())
            )
        else:
            with _quiet_lightning():
                pl.seed_everything(seed, workers=True)
                loader = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(data.images.cpu(), y, ref_emb),
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(seed),
                    num_workers=0,
                )
                was_deterministic = torch.are_deterministic_algorithms_enabled()
                trainer = pl.Trainer(
                    max_epochs=cfg.epochs,
                    accelerator="gpu" if rec.device.type == "cuda" else "cpu",
                    devices=1,
                    deterministic="warn",
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=progress,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    log_every_n_steps=1,
                )
                try:
                    trainer.fit(module, train_dataloaders=loader)
                finally:
                    torch.use_deterministic_algorithms(was_deterministic)
            history = tuple(module.history)
            if checkpoints is not None:
                saved = {f"backbone.{k}": v.detach().cpu() for k, v in module.backbone.state_dict().items()}
                saved["head"] = module.head.detach().cpu()
                saved["history"] = torch.tensor(
                    [[h["loss"], h["train_accuracy"]] for h in history], dtype=torch.float64
                )
                checkpoints.save(key, saved)
        seconds = time.perf_counter() - start
        trained = copy.deepcopy(module.backbone).to(rec.device)
        adapted = TorchRecognizer(
            name=rec.name, module=trained, spec=rec.spec, embedding_dim=rec.embedding_dim,
            weights_id=f"{rec.weights_id}+{self.name}:{key}",
        )  # fmt: skip
        seen = data.images.shape[0] * cfg.epochs
        last = history[-1] if history else {"loss": float("nan"), "train_accuracy": float("nan")}
        report = TrainReport(
            adaptation=self.name, n_images=int(data.images.shape[0]), n_identities=len(classes), epochs=cfg.epochs,
            seconds=seconds, images_per_s=(seen / seconds) if not cached and seconds > 0 else float("nan"),
            cached=cached, device=str(rec.device), final_loss=float(last["loss"]),
            final_train_accuracy=float(last["train_accuracy"]), config_hash=key, history=history,
        )  # fmt: skip
        return Adapted(recognizer=adapted, classes=classes, head=module.head.detach().cpu(), report=report)
