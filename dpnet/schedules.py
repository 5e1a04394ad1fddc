"""Learning-rate schedules: the factor by which the base learning rate is multiplied at each iteration.

A schedule is a callable `factor(iteration) -> float` (iteration counts from 0) built by `make_schedule`.
"""

import math


def make_schedule(name="constant", total_iterations=None, warmup_iterations=0, decay=0.1, milestones=(),
                  final_factor=0.0, iterations_per_epoch=None):
    """Build a schedule.

    - name: 'constant'; 'exponential' (multiply by `decay` after every epoch of `iterations_per_epoch`, as the
      Solver's lr_decay does); 'step' (multiply by `decay` at each iteration in `milestones`); 'cosine' (from 1 down
      to `final_factor` over `total_iterations`, by half a cosine wave)
    - warmup_iterations: the factor rises linearly from 1/warmup to 1 over these first iterations (any schedule)
    """
    if warmup_iterations < 0:
        raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}")
    if name == "constant":
        main = _constant
    elif name == "exponential":
        if not iterations_per_epoch or iterations_per_epoch < 1:
            raise ValueError("the exponential schedule needs iterations_per_epoch >= 1")
        main = lambda t: decay ** (t // iterations_per_epoch)  # noqa: E731
    elif name == "step":
        milestones = sorted(int(m) for m in milestones)
        main = lambda t: decay ** sum(t >= m for m in milestones)  # noqa: E731
    elif name == "cosine":
        if not total_iterations or total_iterations < 1:
            raise ValueError("the cosine schedule needs total_iterations >= 1")
        span = max(total_iterations - warmup_iterations, 1)
        main = lambda t: final_factor + (1 - final_factor) * 0.5 * (  # noqa: E731
            1 + math.cos(math.pi * min(max(t - warmup_iterations, 0), span) / span))
    else:
        raise ValueError(f"unknown learning-rate schedule {name!r}: choose 'constant', 'exponential', 'step' or "
                         "'cosine'")
    if warmup_iterations == 0:
        return main
    return lambda t: main(t) * min(1.0, (t + 1) / warmup_iterations)


def _constant(t):
    return 1.0
