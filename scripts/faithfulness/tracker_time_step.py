"""Seconds per training step of SFace fine-tuning at FaceCure's batch size (32), on this machine.

Output: benchmarks/results/faithfulness/tracker_time_step.txt (see that folder's README for the machine).

A deep copy of SFace in training mode plus a 20-class linear head on its raw output (FaceCure's head), Adadelta
(lr 1.0, rho 0.95, eps 1e-7), on one fixed random batch of 32 112x112 images with random labels (seed 0):
times 6 forward + cross-entropy + backward + optimiser steps and prints torch's thread count and the seconds
of each step. Uses no dataset.

    python scripts/faithfulness/tracker_time_step.py > benchmarks/results/faithfulness/tracker_time_step.txt
"""

import copy
import time

import torch
import torch.nn.functional as F

from cloakbench.attacks.recognizers import RECOGNIZERS


def main() -> None:
    torch.manual_seed(0)
    rec = RECOGNIZERS.create("sface")
    m = copy.deepcopy(rec.module)
    m.train()
    for p in m.parameters():
        p.requires_grad_(True)
    head = torch.nn.Linear(rec.embedding_dim, 20)
    opt = torch.optim.Adadelta(list(m.parameters()) + list(head.parameters()), lr=1.0, rho=0.95, eps=1e-7)
    x = torch.rand(32, 3, 112, 112)
    y = torch.randint(0, 20, (32,))
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        loss = F.cross_entropy(head(m(rec.preprocess(x))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
    print("threads", torch.get_num_threads(), "s/step batch32:", [round(t, 2) for t in ts])


if __name__ == "__main__":
    main()
