"""MixUp and CutMix: training images mixed in pairs, their labels mixed in proportion (soft targets).

MixUp (Zhang et al., 2018) blends each image x with a partner x': lam * x + (1 - lam) * x', lam ~ Beta(alpha, alpha).
CutMix (Yun et al., 2019) pastes a box of x' into x; lam is then the fraction of x left uncovered, 1 - (box area) /
(image area), the box actually pasted (clipped at the borders). Either way the target is lam * onehot(y) +
(1 - lam) * onehot(y'), a distribution over the classes that the loss must accept (dpnet.layers.softmax_loss does).

As in dpnet.augment, the random choices of a whole global minibatch are drawn first (`draw`: one Mix per batch, the
same on every process) and then applied to any rows of it (`apply`, `Mix.targets`): each process fetches its own rows'
partners and mixes them, so that N processes compute exactly what one process computes on the whole batch. Each batch
is mixed with probability `probability`; with both MixUp and CutMix enabled a mixed batch uses one of them, CutMix with
probability `cutmix_probability` (timm's Mixup in its "batch" mode).
"""

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np


class Mix(NamedTuple):
    """How one global batch of n images is mixed.

    - partner: (n,) a permutation of range(n): the position in the batch of each image's partner
    - lam: the weight of each image itself; its partner's is 1 - lam
    - box: (top, bottom, left, right), the rectangle of the partner pasted into each image (CutMix), or None (MixUp)
    """

    partner: np.ndarray
    lam: float
    box: Optional[tuple]

    def targets(self, labels, partner_labels, num_classes):
        """Soft targets (n, num_classes) float64: lam on each row's label plus 1 - lam on its partner's label (the two
        add up when they are the same class). labels, partner_labels: (n,) integer labels."""
        rows = np.arange(len(labels))
        targets = np.zeros((len(labels), num_classes))
        targets[rows, labels] = self.lam
        targets[rows, partner_labels] += 1 - self.lam
        return targets


@dataclass(frozen=True)
class Mixing:
    """What to mix: MixUp with Beta(`mixup`, `mixup`) weights and CutMix with Beta(`cutmix`, `cutmix`) box areas (an
    alpha of 0 disables either); each batch is mixed with probability `probability`, and when both are enabled with
    CutMix at probability `cutmix_probability`, else MixUp."""

    mixup: float = 0.0
    cutmix: float = 0.0
    probability: float = 1.0
    cutmix_probability: float = 0.5

    def __post_init__(self):
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} is the alpha of a Beta distribution and must be a finite number >= 0 (0: "
                                 f"off), got {value!r}")
        for name in ("probability", "cutmix_probability"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and 0 <= value <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")

    @property
    def enabled(self):
        """Whether any batch is ever mixed."""
        return (self.mixup > 0 or self.cutmix > 0) and self.probability > 0

    def draw(self, rng, n, image_shape=()):
        """The mixing of a global batch of n images of shape image_shape ((C, H, W); CutMix needs H and W): a Mix, or
        None when the batch is left unmixed. Every process draws it from the same generator state."""
        if rng.random() >= self.probability:
            return None
        cut = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.cutmix_probability)
        alpha = self.cutmix if cut else self.mixup
        lam = float(rng.beta(alpha, alpha))
        partner = rng.permutation(n)
        if not cut:
            return Mix(partner, lam, None)
        height, width = image_shape[-2:]
        ratio = math.sqrt(1 - lam)  # the box covers about 1 - lam of the image
        h, w = int(height * ratio), int(width * ratio)
        cy, cx = (int(c) for c in rng.integers(0, (height, width)))  # its centre, anywhere: clipped at the borders
        top, left = max(cy - h // 2, 0), max(cx - w // 2, 0)
        bottom, right = min(cy - h // 2 + h, height), min(cx - w // 2 + w, width)
        area = max(bottom - top, 0) * max(right - left, 0)
        return Mix(partner, 1 - area / (height * width), (top, max(bottom, top), left, max(right, left)))

    @staticmethod
    def apply(X, partners, mix):
        """Mix the rows X (k, ...) of a batch with their partners' rows (k, ...), transformed alike: X mixed in place
        (MixUp: lam * X + (1 - lam) * partners, partners overwritten too; CutMix: the box of the partners pasted into
        the last two axes (H, W) of X). Returns X (float64 if it was of integers)."""
        if X.dtype.kind != "f":
            X, partners = X.astype(np.float64), partners.astype(np.float64)
        if mix.box is None:
            partners *= 1 - mix.lam
            X *= mix.lam
            X += partners
        else:
            top, bottom, left, right = mix.box
            X[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        return X
