"""The per-epoch sample orders of the training scripts (training.common)."""

import torch

from training.common import Dist, epoch_order, grouped_epoch_order


def dist(rank: int = 0, world_size: int = 1) -> Dist:
    return Dist(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


def groups_of(sizes: list[int]) -> list[list[int]]:
    out, k = [], 0
    for n in sizes:
        out.append(list(range(k, k + n)))
        k += n
    return out


def test_grouped_order_is_a_permutation_that_keeps_each_group_together():
    groups = groups_of([5, 5, 6, 5, 7, 5, 5])
    order = grouped_epoch_order(groups, seed=3, epoch=0, d=dist())
    assert sorted(order) == list(range(38))
    # Each group appears as one contiguous run, in its own order.
    runs = [order[i : i + len(g)] for i in range(len(order)) for g in groups if order[i] == g[0]]
    assert sorted(map(tuple, runs)) == sorted(map(tuple, groups))
    # Same seed and epoch, same order; another epoch, another order of the groups.
    assert grouped_epoch_order(groups, 3, 0, dist()) == order
    assert grouped_epoch_order(groups, 3, 1, dist()) != order


def test_grouped_order_gives_every_rank_the_same_number_of_samples_as_epoch_order():
    groups = groups_of([5, 6, 5, 7, 5])  # 28 samples
    for world in (2, 3):
        per_rank = [grouped_epoch_order(groups, 0, 0, dist(r, world)) for r in range(world)]
        plain = [epoch_order(28, 0, 0, dist(r, world)) for r in range(world)]
        assert [len(o) for o in per_rank] == [len(o) for o in plain]
        # Together the ranks cover every sample; only a group at a rank boundary is split.
        owner = {k: r for r, o in enumerate(per_rank) for k in o}
        assert set(owner) == set(range(28))
        assert sum(len({owner[k] for k in g}) > 1 for g in groups) <= world - 1
