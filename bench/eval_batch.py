"""Evaluation time against the evaluation batch size, relative to batches of 1,000.

    python bench/eval_batch.py [--model resnet20] [--dataset fashion-mnist] [--repeats 3]

Every experiment ends with an evaluation of the whole test split (10,000 images for
Fashion-MNIST), so its speed sets the floor of an experiment's cost. Times
`ckpt_tools.train.evaluate` of a freshly built model for several batch sizes (median of
`--repeats`, after one warm-up pass) and prints each as a ratio to batches of 1,000.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ckpt_tools.train import TrainConfig, build, evaluate

SIZES = (1000, 500, 250, 128, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    model, data = build(TrainConfig(model=opts.model, dataset=opts.dataset))
    evaluate(model, data, batch_size=128)  # warm-up
    times = {}
    for size in SIZES:
        runs = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            evaluate(model, data, batch_size=size)
            runs.append(time.perf_counter() - start)
        times[size] = statistics.median(runs)
    print(f"{opts.model} on {opts.dataset}: {len(data.y_test)} test images, "
          f"{torch.get_num_threads()} threads")
    print("batch  seconds  vs 1000")
    for size, seconds in times.items():
        print(f"{size:5d}  {seconds:7.2f}  {seconds / times[1000]:7.2f}")


if __name__ == "__main__":
    main()
