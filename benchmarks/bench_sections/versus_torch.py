"""Section `torch`: dpnet against PyTorch on the same MLP, each in its own process, alternating in ABBA rounds."""

import importlib.util
import tempfile

import numpy as np

from .common import (INPUT_SHAPE, LEARNING_RATES, NUM_CLASSES, TORCH_HINT, median_ms, progress, synthetic_batch,
                     timed)
from .step import dpnet_step
from .workers import run_worker


def torch_step(hidden_dims, batch_size, dtype, rule):
    """step() is one training step of the same MLP in PyTorch: zero_grad, forward, cross-entropy, backward, step."""
    import torch

    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]
    dims = [int(np.prod(INPUT_SHAPE)), *hidden_dims, NUM_CLASSES]
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1]).to(torch_dtype)
    X, y = synthetic_batch(batch_size, dtype)
    X, y = torch.from_numpy(X.reshape(batch_size, -1)), torch.from_numpy(y)
    lr = LEARNING_RATES[rule]
    if rule == "sgd_momentum":
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    elif rule == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(X), y).backward()
        optimizer.step()

    return step


def worker_framework(spec):
    """Inside a worker process: time every (dtype, rule) of one framework ("dpnet" or "torch")."""
    from dpnet.parallel import set_blas_threads

    set_blas_threads(spec["threads"])
    if spec["framework"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
        make = torch_step
    else:
        make = lambda *a: dpnet_step(*a)[1]  # noqa: E731
    results = {}
    for dtype in spec["dtypes"]:
        for rule in spec["rules"]:
            step = make(spec["hidden_dims"], spec["batch_size"], dtype, rule)
            times = [timed(step) for _ in range(spec["warmup"] + spec["repeats"])]
            results[f"{dtype} {rule}"] = times[spec["warmup"]:]
    info = {}
    if spec["framework"] == "torch":
        info = dict(version=torch.__version__, threads=torch.get_num_threads())
    return dict(times=results, info=info)


def section_torch(args):
    cases = [(dtype, rule) for dtype in args.dtypes for rule in args.torch_rules]
    if importlib.util.find_spec("torch") is None:
        return dict(available=False, note=TORCH_HINT,
                    rows=[dict(dtype=d, rule=r, note=TORCH_HINT) for d, r in cases])
    spec = dict(hidden_dims=args.hidden_dims, batch_size=args.batch_size, threads=args.threads,
                dtypes=args.dtypes, rules=args.torch_rules, warmup=args.warmup, repeats=args.repeats)
    runs = {"dpnet": [], "torch": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for framework in ("dpnet", "torch") if r % 2 == 0 else ("torch", "dpnet"):  # ABBA
                progress(f"torch section, round {r + 1}/{args.rounds}: {framework}")
                runs[framework].append(run_worker("framework", dict(spec, framework=framework), folder,
                                                  threads=args.threads))
    rows = []
    for dtype, rule in cases:
        key = f"{dtype} {rule}"
        ours = [t for run in runs["dpnet"] for t in run["times"][key]]
        theirs = [t for run in runs["torch"] for t in run["times"][key]]
        dpnet_ms, torch_ms = median_ms(ours), median_ms(theirs)
        rows.append(dict(dtype=dtype, rule=rule, dpnet_ms=dpnet_ms, torch_ms=torch_ms,
                         dpnet_samples_per_sec=args.batch_size / dpnet_ms * 1e3,
                         torch_samples_per_sec=args.batch_size / torch_ms * 1e3, speedup=torch_ms / dpnet_ms,
                         dpnet_ms_per_round=[median_ms(run["times"][key]) for run in runs["dpnet"]],
                         torch_ms_per_round=[median_ms(run["times"][key]) for run in runs["torch"]]))
    return dict(available=True, torch=runs["torch"][0]["info"], rows=rows)
