"""An update rule applied to one parameter array at a time, with decoupled weight decay: through the rule's in-place
variant when it has one and the arrays allow it, else through the pure rule."""

import numpy as np

from .solver_checks import accepts_keyword


class RuleUpdate:
    """`rule(w, dw, config) -> (next_w, config)` (see dpnet.optim), with `weight_decay` applied to weights as AdamW
    does: w - lr * (step + weight_decay * w). Call it as `update(w, dw, config, is_weight)`; w may be overwritten."""

    def __init__(self, rule, weight_decay=0.0):
        self.rule, self.weight_decay = rule, weight_decay
        self.in_place = getattr(rule, "in_place", None)  # the rule's in-place variant, if it has one
        self._in_place_scales = self.in_place is not None and accepts_keyword(self.in_place, "w_scale")

    def __call__(self, w, dw, config, is_weight):
        """(next_w, config) for one array w (N-d or a flat segment) and its gradient dw."""
        decay = self.weight_decay if is_weight else 0.0
        if self.in_place is not None and _can_update_in_place(w, dw, config, decay):
            # the built-in steps do not depend on w: scaling w first is the decay
            return self.apply_in_place(w, dw, config, 1 - config["learning_rate"] * decay if decay else 1)
        next_w, config = self.rule(w, dw, config)
        if decay:
            if "learning_rate" not in config:
                raise ValueError("weight_decay scales with the learning rate, but the update rule's config has no "
                                 "'learning_rate'")
            next_w -= (config["learning_rate"] * decay) * w
        return next_w, config

    def apply_in_place(self, w, dw, config, w_scale):
        """The rule's in-place variant on w after scaling w by w_scale: within the rule's own pass when it takes
        `w_scale` (the built-in rules do), else in a pass of its own."""
        if w_scale == 1:
            return self.in_place(w, dw, config)
        if self._in_place_scales:
            return self.in_place(w, dw, config, w_scale=w_scale)
        w *= w_scale
        return self.in_place(w, dw, config)


def _can_update_in_place(w, dw, config, decay):
    return (isinstance(w, np.ndarray) and isinstance(dw, np.ndarray) and w.shape == dw.shape
            and w.dtype.kind == "f" and w.dtype == np.result_type(w, dw) and (not decay or "learning_rate" in config))
