"""The pipeline's thread choice follows the load as it changes, instead of keeping the first choice."""

from __future__ import annotations

import torch

from flows.stages import AdaptiveThreads


def test_threads_are_picked_again_as_the_load_changes() -> None:
    picks = iter([1, 2, 2, 2])
    adapt = AdaptiveThreads(every=50, pick=lambda: next(picks))
    before = torch.get_num_threads()
    try:
        seen = []
        for step in range(0, 151):
            adapt(step)
            seen.append(torch.get_num_threads())
        assert seen[0] == 1 and seen[49] == 1 and seen[50] == 2 and seen[150] == 2
    finally:
        torch.set_num_threads(before)
