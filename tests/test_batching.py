import random

from cai.batching import epoch_order


def padded_cost(order, lengths, per_step):
    steps = [order[k:k + per_step] for k in range(0, len(order), per_step)]
    return sum(max(lengths[i] for i in s) * len(s) for s in steps)


def test_plain_order_is_the_seeded_shuffle():
    order = epoch_order([5] * 10, 4, "0|epoch0", group_by_length=False)
    expected = list(range(10))
    random.Random("0|epoch0").shuffle(expected)
    assert order == expected


def test_grouped_order_is_a_permutation_with_sorted_steps():
    lengths = [10, 200, 12, 190, 11, 180, 13, 170]  # short and long rows alternate
    order = epoch_order(lengths, 4, "7|epoch0", group_by_length=True)
    assert sorted(order) == list(range(8))
    steps = [sorted(lengths[i] for i in order[k:k + 4]) for k in (0, 4)]
    assert sorted(steps) == [[10, 11, 12, 13], [170, 180, 190, 200]]  # no step mixes short and long
    # padded tokens: 4*13 + 4*200 = 852, against 4*200 + 4*200 = 1600 when every step holds a long row
    assert padded_cost(order, lengths, 4) == 852


def test_grouped_order_is_deterministic_and_keyed():
    lengths = [random.Random(i).randint(5, 300) for i in range(64)]
    a = epoch_order(lengths, 8, "0|epoch0", True)
    assert a == epoch_order(lengths, 8, "0|epoch0", True)
    assert a != epoch_order(lengths, 8, "0|epoch1", True)
    assert padded_cost(a, lengths, 8) < padded_cost(epoch_order(lengths, 8, "0|epoch0", False), lengths, 8)


def test_windows_bound_the_sorting_and_a_short_step_stays_last():
    lengths = list(range(9))
    order = epoch_order(lengths, 2, "k", True, window_steps=2)  # windows of 4 rows, sorted within each only
    shuffled = list(range(9))
    random.Random("k").shuffle(shuffled)
    windows = [set(shuffled[0:4]), set(shuffled[4:8])]
    assert sorted(order) == list(range(9))
    for k in range(0, 8, 2):
        assert any(set(order[k:k + 2]) <= w for w in windows)
        assert lengths[order[k]] > lengths[order[k + 1]]  # longest first within a step
    assert order[-1] == shuffled[8]  # the short last step is not shuffled into the middle
