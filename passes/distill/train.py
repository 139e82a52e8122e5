"""The distillation loop: the teacher (ONNX Runtime) and the student (``engine.TorchGraph``)
see the same batch; the student's trainable initializers take an AdamW step on the loss
between their outputs; the held-out loss decides when to stop and which weights to keep.

Losses, each normalised so that its weight means the same on any model:

* encoders: token hidden states, ``||s - t||^2 / ||t||^2`` over real tokens, plus
  ``1 - cosine`` of the mask-pooled sentence embeddings;
* decoders: ``KL(teacher || student)`` of the next-token distributions at temperature T
  (times T^2), over real tokens;
* both: the layers' residual-stream states, matched layer by layer like the token
  states (``layer_weight``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from onnxpress.calibration import replace_tokens
from onnxpress.passes.distill.data import TextBatches, feeds_for

CLIP_NORM = 1.0  # gradient norm clipping, the usual guard for transformer training
# the teacher's held-out targets are computed once and kept when they take at most this much
# (an encoder's hidden states); a decoder's logits over its vocabulary are recomputed instead
HOLDOUT_CACHE_BYTES = 256 * 2**20


@dataclass
class Targets:
    """What the student is trained to reproduce: output names, and pairs of intermediate
    values (teacher name, student name) matched layer by layer."""

    output: str
    decoder: bool
    layers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: float
    max_seconds: float
    eval_every: int
    patience: int
    augment: float = 0.0  # share of training tokens replaced by random ones

    def fraction_done(self, step: int, seconds: float) -> float:
        """How far training is, 0 to 1: by steps, or by wall time where the time limit comes first,
        so that the learning rate has decayed by the time either ends training (a run the time
        limit ends therefore depends on the machine's speed; one that ``steps`` ends does not)."""
        return min(1.0, max(step / self.steps, seconds / self.max_seconds))

    def may_stop_early(self, done: float) -> bool:
        """Early stopping counts evaluations only once the learning rate has decayed to half its
        peak: near the peak a plateau of a few evaluations is the step size's noise (MiniLM
        low-rank at lr 5e-5 stopped at step 400 of a run whose other seed improved to step 2,300)."""
        return done >= self.warmup + (1 - self.warmup) / 2

    def lr_at(self, done: float) -> float:
        """Linear warm-up over the first ``warmup`` share, then cosine decay to zero at the end."""
        if done < self.warmup:
            return self.lr * max(done, 1.0 / self.steps) / self.warmup
        return self.lr * 0.5 * (1 + math.cos(math.pi * (done - self.warmup) / (1 - self.warmup)))


@dataclass
class History:
    holdout_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""
    best_step: int = 0


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 over the real tokens of [batch, seq, ...] states."""
    keep = mask.to(student.dtype).reshape(*mask.shape, *([1] * (student.dim() - 2)))
    return ((student - teacher) ** 2 * keep).sum() / ((teacher**2) * keep).sum().clamp_min(1e-12)


def _kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(teacher / temperature, -1)
    log_q = torch.log_softmax(student / temperature, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0) * temperature**2


@dataclass
class Loss:
    targets: Targets
    hidden_weight: float = 1.0
    cosine_weight: float = 1.0
    layer_weight: float = 1.0
    temperature: float = 2.0

    def __call__(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                 mask: torch.Tensor) -> torch.Tensor:
        t = self.targets
        s_out, t_out = student[t.output], teacher[t.output]
        mask = mask[:, -s_out.shape[1]:]
        if t.decoder:
            loss = _kl(s_out, t_out, mask, self.temperature)
        else:
            loss = self.hidden_weight * _token_mse(s_out, t_out, mask)
            cos = torch.nn.functional.cosine_similarity(pooled(s_out, mask), pooled(t_out, mask), dim=-1)
            loss = loss + self.cosine_weight * (1.0 - cos).mean()
        if t.layers and self.layer_weight:
            layer = sum(_token_mse(student[s], teacher[tn], mask) for tn, s in t.layers) / len(t.layers)
            loss = loss + self.layer_weight * layer
        return loss


class Trainer:
    """One distillation run; ``teacher(feeds)`` returns the teacher's target arrays by name."""

    def __init__(self, student, student_model, teacher_model, teacher, loss: Loss, params: dict, schedule: Schedule,
                 *, progress: bool, bfloat16: bool = False):
        self.student, self.student_model, self.teacher_model, self.teacher = student, student_model, teacher_model, teacher
        self.loss, self.schedule, self.progress = loss, schedule, progress
        self.params = params
        self.bfloat16 = bfloat16
        # fused: one kernel for every tensor's update (MiniLM, 20.8 M weights: 7 ms a step, not 21)
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=schedule.lr, weight_decay=0.0, fused=True)
        targets = loss.targets
        self.student_names = [targets.output, *(s for _, s in targets.layers)]
        self._holdout_targets: list[dict[str, np.ndarray]] | None = None
        self._cache_holdout = True  # until the first evaluation finds the targets too large

    def batch_loss(self, ids: np.ndarray, mask: np.ndarray, teacher: dict[str, np.ndarray] | None = None
                   ) -> torch.Tensor:
        if teacher is None:
            teacher = self.teacher(feeds_for(self.teacher_model, ids, mask))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bfloat16):
            student = self.student(feeds_for(self.student_model, ids, mask), self.student_names)
        student = {k: v.to(torch.float32) for k, v in student.items()}
        # a half-precision teacher's targets, compared in float32
        targets = {k: torch.from_numpy(v).to(torch.float32) for k, v in teacher.items()}
        return self.loss(student, targets, torch.from_numpy(mask))

    @torch.no_grad()
    def holdout_loss(self, data: TextBatches) -> float:
        """The loss over the held-out batches (evaluated every ``eval_every`` steps): the teacher's
        targets are kept from the first evaluation where they fit in ``HOLDOUT_CACHE_BYTES``."""
        cached, fresh, size = self._holdout_targets, [], 0
        losses = []
        for i, (ids, mask) in enumerate(data.holdout):
            teacher = cached[i] if cached is not None else self.teacher(feeds_for(self.teacher_model, ids, mask))
            if cached is None and self._cache_holdout and size <= HOLDOUT_CACHE_BYTES:
                size += sum(v.nbytes for v in teacher.values())
                fresh.append(teacher)
            losses.append(float(self.batch_loss(ids, mask, teacher)) * len(ids))
        if cached is None and self._cache_holdout:
            self._cache_holdout = size <= HOLDOUT_CACHE_BYTES
            self._holdout_targets = fresh if self._cache_holdout else None
        return sum(losses) / sum(len(ids) for ids, _ in data.holdout)

    def run(self, data: TextBatches, seed: int) -> History:
        s, history = self.schedule, History()
        start = time.perf_counter()
        best = self.holdout_loss(data)
        history.holdout_loss.append((0, best))
        best_state = {k: p.detach().clone() for k, p in self.params.items()}
        rng = np.random.default_rng(seed)
        order: list[int] = []
        waited = 0
        bar = tqdm(range(s.steps), desc="distill", unit="step", disable=not self.progress, leave=False)
        for step in bar:
            if not order:
                order = list(rng.permutation(len(data.train)))
            ids, mask = data.train[order.pop()]
            if s.augment and data.replaceable is not None:
                ids = replace_tokens(ids, mask, s.augment, data.replaceable, rng)
            done = s.fraction_done(step, time.perf_counter() - start)
            for group in self.optimizer.param_groups:
                group["lr"] = s.lr_at(done)
            self.optimizer.zero_grad(set_to_none=True)
            self.batch_loss(ids, mask).backward()
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), CLIP_NORM)
            self.optimizer.step()
            history.steps = step + 1
            last = step + 1 == s.steps
            out_of_time = time.perf_counter() - start > s.max_seconds
            if (step + 1) % s.eval_every == 0 or last or out_of_time:
                loss = self.holdout_loss(data)
                history.holdout_loss.append((step + 1, loss))
                bar.set_postfix_str(f"held-out loss {loss:.4g}")
                if loss < best:
                    best, waited, history.best_step = loss, 0, step + 1
                    best_state = {k: p.detach().clone() for k, p in self.params.items()}
                elif s.may_stop_early(done):
                    waited += 1
                if waited >= s.patience:
                    history.stopped = f"held-out loss did not improve for {s.patience} evaluations"
                    break
            if out_of_time:
                history.stopped = f"time limit of {s.max_seconds / 60:g} minutes"
                break
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(best_state[k])
        history.seconds = time.perf_counter() - start
        history.stopped = history.stopped or f"{s.steps} steps"
        return history
