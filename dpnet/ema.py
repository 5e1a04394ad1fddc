"""An exponential moving average (EMA) of a model's parameters and normalization state, kept beside the live ones.

After the parameters w_t of step t the average is a_t = decay * a_{t-1} + (1 - decay) * w_t, starting from the
parameters training starts with. Folding in every `every`-th step only, a = decay**m * a + (1 - decay**m) * w with m
the steps since the last fold, costs 1/every of a pass over the parameters per step and treats the parameters as
constant between folds. The running statistics of normalization layers are averaged alike (as timm's ModelEmaV2
averages a model's buffers), so that the averaged weights are evaluated with statistics of the same horizon.

The arrays are a state dict (dpnet.model_state): "param/<name>" and "norm/<layer>/<key>", of the model's dtypes.
"""

import numbers

import numpy as np

_CHUNK = 1 << 15  # elements folded at a time: the three passes of a chunk stay in the cache


class ExponentialAverage:
    """The average of a sequence of state dicts: `arrays` (empty until `fold` first sees one) and `iteration`, the step
    whose state it last took in."""

    def __init__(self, decay, every=1):
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay < 1:
            raise ValueError(f"ema_decay must be a number in (0, 1), got {decay!r}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"ema_every must be a positive integer, got {every!r}")
        self.decay, self.every = float(decay), int(every)
        self.arrays, self.iteration = {}, 0

    def due(self, iteration):
        """Whether the state after step `iteration` is to be folded in: every `every` steps, and to start with."""
        return not self.arrays or (iteration % self.every == 0 and iteration > self.iteration)

    def fold(self, state, iteration):
        """Take in `state` (a state dict), the state after step `iteration`, weighted for the steps since the last
        fold. Arrays the average does not hold yet (at the start, or state a layer creates at its first step) start as
        copies of the state's."""
        steps = iteration - self.iteration
        if self.arrays and steps <= 0:
            return
        decay = self.decay ** steps
        for key, value in state.items():
            average = self.arrays.get(key)
            if average is None or average.shape != value.shape or average.dtype != value.dtype:
                self.arrays[key] = np.array(value, copy=True)
            else:
                _fold(average.reshape(-1), np.asarray(value).reshape(-1), decay)
        self.iteration = iteration

    def restore(self, arrays, iteration):
        """Continue from saved arrays (a state dict; copies are kept) taken in at step `iteration`."""
        self.arrays = {key: np.array(value, copy=True) for key, value in arrays.items()}
        self.iteration = int(iteration)


def _fold(average, value, decay):
    """average = decay * average + (1 - decay) * value, in place on 1-D arrays, as decay * (average - value) + value
    (no temporary array), a cache-sized chunk at a time."""
    for start in range(0, average.size, _CHUNK):
        a, w = average[start:start + _CHUNK], value[start:start + _CHUNK]
        np.subtract(a, w, out=a)
        a *= decay
        a += w
