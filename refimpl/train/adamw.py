"""AdamW (Loshchilov and Hutter, 2019) with linear warmup and decay, and clipping by global norm.

The update follows torch.optim.AdamW (single-tensor path): weight decay is
decoupled (param *= 1 - lr * weight_decay) and skipped for biases and
LayerNorm weights, as the BERT recipes do. The learning rate of step s
(counted from 0) follows transformers' get_linear_schedule_with_warmup:
lr * s / warmup during warmup, then lr * (total - s) / (total - warmup).

The global gradient norm is the square root of one float64 sum of squares,
over the tensors in state order and each tensor's elements in C order, so it
does not depend on chunking or offloading. Every other step is elementwise.
"""

import math

from refimpl.errors import RefimplError
from refimpl_kernels import backward as kernels


def decays(name):
    """Return whether weight decay applies to parameter ``name`` (not to biases or LayerNorm weights)."""
    return not (name.endswith(".bias") or "LayerNorm" in name)


def linear_schedule(step, base_lr, warmup_steps, total_steps):
    """Return the learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class AdamW:
    """AdamW over a TrainingState; ``step`` counts the updates made so far."""

    def __init__(self, state, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 warmup_steps=0, total_steps=1, max_grad_norm=1.0):
        if lr <= 0:
            raise RefimplError(f"learning rate {lr} is invalid; use a positive number")
        if total_steps < 1:
            raise RefimplError(f"total steps {total_steps} is invalid; use 1 or more")
        self.state = state
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.max_grad_norm = max_grad_norm
        self.step_count = 0

    def learning_rate(self):
        return linear_schedule(self.step_count, self.lr, self.warmup_steps, self.total_steps)

    def global_grad_norm(self):
        total = 0.0
        for name in self.state.names():
            for _, _, block in self.state.grads.blocks(name):
                total = kernels.sum_of_squares(block.reshape(-1), total)
        return math.sqrt(total)

    def step(self):
        """Clip, update every parameter, and advance the schedule; return (grad norm, learning rate)."""
        norm = self.global_grad_norm()
        scale = 1.0
        if self.max_grad_norm and self.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), applied only when below 1
            coefficient = self.max_grad_norm / (norm + 1e-6)
            if coefficient < 1.0:
                scale = coefficient
        lr = self.learning_rate()
        t = self.step_count + 1
        bias_correction1 = 1 - self.beta1 ** t
        bias_correction2_sqrt = math.sqrt(1 - self.beta2 ** t)
        groups = self.state.groups
        for name in self.state.names():
            weight_decay = self.weight_decay if decays(name) else 0.0
            blocks = zip(groups["params"].blocks(name), groups["grads"].blocks(name),
                         groups["exp_avg"].blocks(name), groups["exp_avg_sq"].blocks(name))
            for (_, _, param), (_, _, grad), (_, _, exp_avg), (_, _, exp_avg_sq) in blocks:
                kernels.adamw_update(param.reshape(-1), grad.reshape(-1), exp_avg.reshape(-1),
                                     exp_avg_sq.reshape(-1), lr, self.beta1, self.beta2, self.eps,
                                     weight_decay, bias_correction1, bias_correction2_sqrt, scale)
        self.step_count += 1
        return norm, lr
