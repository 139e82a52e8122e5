"""Recovery by knowledge distillation: the compile's input model (run by ONNX Runtime) teaches
the compressed model, whose float initializers are trained with autograd in PyTorch
(:mod:`.engine`) and written back into the same ONNX graph; nothing else in the graph changes.

Calibration -> decision -> rewrite: unlabeled text from the calibration's sources (:mod:`.data`),
the initializers to train (``scope``: those the earlier passes rewrote, or all float weights),
then AdamW on the loss between student and teacher (:mod:`.train`), keeping the weights with
the best held-out loss. It runs after the structural passes and before attention fusion and
quantization (whose fused and integer ops the engine does not run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxpress.activations import progress_enabled
from onnxpress.analysis import analyze
from onnxpress.analysis.linear import LinearIndex
from onnxpress.cpu import has_bfloat16_matmul
from onnxpress.datasets import load_tokenizer
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import primary_outputs
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.passes.distill.data import batches_from_calibration, read_texts, token_batches

# per token, the float32 copies of the model's output that the loss and its gradient hold at once
LOSS_COPIES = 12
# compiled matrix-product kernels oneDNN keeps (its default: 1,024). It compiles one per shape, and
# sentences of a hundred lengths, each through a dozen weight shapes forward and backward, need
# thousands: with the default, a MiniLM student with 20% of its weights split (low-rank) recompiled
# most of its bfloat16 kernels at every step (1.5 minutes of training: 308 steps, 443 with this)
ONEDNN_KERNEL_CACHE = 16384
# what those kernels took (the same student: the compile's peak memory 3.20 GiB with the default
# cache, 4.65 GiB with this one)
KERNEL_CACHE_BYTES = 3 * 2**29


@dataclass
class DistillConfig(PassConfig):
    steps: int = 6000  # optimizer steps at most (MiniLM: the time limit comes first)
    max_minutes: float = 12.0  # wall-time limit of the training loop
    # peak learning rate (AdamW), after a linear warm-up; cosine decay to 0 at the last step or the
    # time limit, whichever comes first
    lr: float = 1e-4
    warmup: float = 0.1  # share of the steps spent warming up
    batch_size: int = 16
    seed: int | None = None  # None: the compile's seed
    # all: every float weight but embedding tables; rewritten: only the initializers the earlier
    # passes created or changed (at equal steps, MiniLM with a third of its heads pruned recovered
    # less that way: 0.953 against 0.959 off-domain cosine after 300 steps)
    scope: Literal["rewritten", "all"] = "all"
    texts: int = 8000  # training texts at most (sentences for encoders, chunks for decoders)
    max_length: int = 128  # tokens per text
    holdout: float = 0.05  # share of the texts kept aside for the held-out loss
    eval_every: int = 100  # steps between held-out evaluations
    patience: int = 4  # evaluations without improvement before stopping, once the lr has decayed to half its peak
    hidden_weight: float = 1.0  # encoders: token hidden-state loss
    cosine_weight: float = 1.0  # encoders: pooled-embedding cosine loss
    layer_weight: float = 1.0  # both: per-layer residual-stream loss (0: off)
    temperature: float = 2.0  # decoders: KL temperature
    # share of the training tokens replaced by random vocabulary tokens (text data only): the
    # student then also matches the teacher on words the training text does not contain
    augment: float = 0.15
    # the student's matrix products: auto is bfloat16 (torch autocast; weights, AdamW and losses
    # stay float32) where the CPU multiplies bfloat16 in hardware (AMX, AVX-512 BF16), else float32
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "texts", "max_length", "eval_every", "patience"):
            if getattr(self, name) < 1:
                self.fail(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.max_minutes <= 0:
            self.fail("max_minutes", f"must be positive, e.g. 10, got {self.max_minutes}")
        if not 0 < self.lr < 1:
            self.fail("lr", f"must be between 0 and 1, e.g. 1e-4, got {self.lr}")
        if not 0 <= self.warmup < 1:
            self.fail("warmup", f"must be in [0, 1), e.g. 0.05, got {self.warmup}")
        if not 0 < self.holdout < 0.5:
            self.fail("holdout", f"must be in (0, 0.5), e.g. 0.05, got {self.holdout}")
        for name in ("hidden_weight", "cosine_weight", "layer_weight"):
            if getattr(self, name) < 0:
                self.fail(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.augment < 1:
            self.fail("augment", f"must be in [0, 1), e.g. 0.15, got {self.augment}")
        if self.temperature <= 0:
            self.fail("temperature", f"must be positive, e.g. 2, got {self.temperature}")


@register_pass
class DistillPass(Pass):
    name = "distill"
    config_class = DistillConfig
    needs_calibration = True
    needs_original = True
    # the float32 student, its gradients and AdamW's two moments, and the teacher's ORT session
    memory_multiple = 5.0
    mapped_memory_multiple = 5.0  # the student is trained in memory, wherever its weights came from

    def working_memory(self, model: ir.Model) -> int:
        """One training batch's activations: every linear layer's input and output kept for the
        backward pass, twice over for the norms, activations and attention between them, and
        ``LOSS_COPIES`` of the output per token (a decoder's logits over its vocabulary: the
        teacher's and the student's, their softmaxes, differences and gradients). SmolLM2-135M
        with a quarter of its FFN pruned, 16 x 128 tokens: 9.4 GiB, and 2.1 GiB for 5x its
        weights, on top of the 1.9 GiB the compile held before; the pass peaked at 11.0 GiB in
        3 minutes and 15.4 GiB in 12 (bfloat16 products, AMX Xeon), where the weights' multiple
        alone estimated 2.1 GiB. Products in bfloat16 add oneDNN's compiled kernels
        (``KERNEL_CACHE_BYTES``)."""
        per_token = 2 * sum(lin.d_in + lin.d_out for lin in LinearIndex(model.graph).ordered)
        output = model.graph.outputs[0].shape
        if output is not None and len(output) and isinstance(output[-1], int):
            per_token += LOSS_COPIES * output[-1]
        kernels = KERNEL_CACHE_BYTES if self._bfloat16() else 0
        return 4 * per_token * self.config.batch_size * self.config.max_length + kernels

    def _bfloat16(self) -> bool:
        precision = self.config.precision
        return precision == "bfloat16" or (precision == "auto" and has_bfloat16_matmul())

    def apply(self, model: ir.Model, ctx) -> Outcome:
        # torch is imported here: onnxpress runs without it until a pipeline distills
        from onnxpress.passes.distill.engine import TorchGraph, check_supported, training_copy
        from onnxpress.passes.distill.train import Loss, Schedule, Trainer

        torch = _torch()
        cfg: DistillConfig = self.config
        check_supported(model.graph)
        teacher_model = ctx.original
        if teacher_model is None:
            raise OnnxpressError("distill: no original model to learn from (run it through the pipeline)")
        trainable = trainable_initializers(model, teacher_model, cfg.scope)
        if not trainable:
            return Outcome(changes={"tensors_trained": 0},
                           details={"note": "no initializer differs from the original model: nothing to recover"})
        decoder = "logits" in [v.name for v in model.graph.outputs]
        seed = ctx.seed if cfg.seed is None else cfg.seed
        bfloat16 = self._bfloat16()
        data = self._data(model, ctx, cfg, decoder, seed)
        targets, notes = _targets(model, teacher_model, decoder, cfg.layer_weight > 0)
        threads = torch.get_num_threads()
        torch.set_num_threads(ctx.threads or os.cpu_count() or 1)
        torch.manual_seed(seed)
        try:
            student_model = training_copy(model)
            student = TorchGraph(student_model, trainable)
            teacher = _teacher_runner(teacher_model, targets, ctx.threads)
            loss = Loss(targets, cfg.hidden_weight, cfg.cosine_weight, cfg.layer_weight, cfg.temperature)
            schedule = Schedule(cfg.steps, cfg.lr, cfg.warmup, 60.0 * cfg.max_minutes, cfg.eval_every, cfg.patience,
                                cfg.augment)
            params = student.trainable_parameters()
            trainer = Trainer(student, student_model, teacher_model, teacher, loss, params, schedule,
                              progress=progress_enabled(), bfloat16=bfloat16)
            history = trainer.run(data, seed)
            written = student.write_back(model)
        finally:
            torch.set_num_threads(threads)
        losses = history.holdout_loss
        return Outcome(
            changes={"tensors_trained": written, "steps": history.steps},
            details={
                "text": data.source, "texts": data.texts, "train_batches": len(data.train),
                "holdout_batches": len(data.holdout), "scope": cfg.scope,
                "parameters_trained": int(sum(p.numel() for p in params.values())),
                "matmul_precision": "bfloat16" if bfloat16 else "float32",
                "loss": "KL of next-token distributions" if decoder else "token hidden-state MSE + pooled cosine",
                "layers_matched": len(targets.layers), "holdout_loss_before": losses[0][1],
                "holdout_loss_after": min(loss for _, loss in losses), "best_step": history.best_step,
                "holdout_curve": [[s, v] for s, v in losses], "stopped": history.stopped,
                "seconds": round(history.seconds, 1), "notes": notes,
            },
        )

    def _data(self, model: ir.Model, ctx, cfg: DistillConfig, decoder: bool, seed: int):
        found = read_texts(ctx, sentences=not decoder, max_chars=4 * cfg.max_length)
        if found is None:
            return batches_from_calibration(ctx.require_calibration(self.name), cfg.holdout)
        texts, source = found
        if ctx.tokenizer_dir is None:
            raise OnnxpressError("distill: text training data needs a tokenizer: pass --tokenizer DIR")
        tokenizer = load_tokenizer(ctx.tokenizer_dir)
        data = token_batches(texts, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                             holdout=cfg.holdout, max_texts=cfg.texts, seed=seed)
        data.source = source
        if cfg.augment:
            data.replaceable = ctx.replaceable_tokens()
        return data


def trainable_initializers(model: ir.Model, original: ir.Model, scope: str) -> list[str]:
    """Float initializers with more than one element to train: all of them (``scope`` all,
    embedding tables excepted), or those missing from ``original`` or different there."""
    names = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point() or tensor.size < 2 or _only_gathered(value):
            continue
        if scope == "all" or _rewritten(name, tensor, original):
            names.append(name)
    return names


def _only_gathered(value: ir.Value) -> bool:
    """An embedding table: read only as a Gather's data (sparse rows; its update is the costliest)."""
    uses = list(value.uses())
    return bool(uses) and all(node.op_type == "Gather" and index == 0 for node, index in uses)


def _rewritten(name: str, tensor, original: ir.Model) -> bool:
    before = original.graph.initializers.get(name)
    if before is None or before.const_value is None:
        return True
    old = before.const_value
    return tuple(old.shape) != tuple(tensor.shape) or not np.array_equal(old.numpy(), tensor.numpy())


def _torch():
    # read once, when oneDNN compiles its first kernel in the process; a user's setting is kept
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNEL_CACHE))
    try:
        import torch
    except ImportError:
        raise OnnxpressError("distill needs PyTorch: pip install torch (the CPU wheel), then onnxpress[export]") from None
    return torch


def _targets(model: ir.Model, original: ir.Model, decoder: bool, layers: bool):
    """The output to match and, per layer, the residual stream after it in both models."""
    from onnxpress.passes.distill.train import Targets

    output = "logits" if decoder else primary_outputs(model)[0]
    targets, notes = Targets(output, decoder), []
    if not layers:
        return targets, notes
    student, teacher = _layer_states(model), _layer_states(original)
    if len(student) != len(teacher) or not student:
        notes.append(f"layer states not matched ({len(teacher)} in the original, {len(student)} now): "
                     "output loss only")
        return targets, notes
    targets.layers = list(zip(teacher, student, strict=True))
    return targets, notes


def _layer_states(model: ir.Model) -> list[str]:
    """Per layer, the value of its last residual Add (the residual stream after the block)."""
    states = []
    for layer in analyze(model).layers:
        if not layer.residual_adds:
            return []
        states.append(layer.residual_adds[-1].outputs[0].name)
    return states


def _teacher_runner(model: ir.Model, targets, threads: int | None):
    """``run(feeds) -> {name: array}``: the targets' values of the original model, in ONNX Runtime."""
    from onnxpress.activations import Tap

    return Tap(model, [targets.output, *(t for t, _ in targets.layers)], threads=threads).run
