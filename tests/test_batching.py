import random

from cai.train.batching import dealt_order, epoch_order


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


def test_dealt_order_gives_every_rank_the_same_share_of_each_step():
    """2 ranks x 2 rows x 2 micro-steps: batch i of the sequence goes to rank i % 2."""
    lengths = [random.Random(i).randint(5, 300) for i in range(40)]
    order = dealt_order(lengths, batch_size=2, world=2, grad_accum=2, key="3", group_by_length=True, epochs=2)
    assert len(order) == 80 and sorted(order[:40]) == sorted(order[40:]) == list(range(40))
    assert order[40:] != order[:40]  # each epoch its own shuffle
    first = epoch_order(lengths, 8, "3|epoch0", True)[:8]  # the first step: 8 rows, longest first
    batches = [order[k:k + 2] for k in range(0, 8, 2)]  # micro 0: ranks 0, 1; micro 1: ranks 0, 1
    assert batches == [[first[0], first[2]], [first[1], first[3]], [first[4], first[6]], [first[5], first[7]]]
    for k in range(0, 40, 8):  # every step and micro-step: rank 0's longest row is the longer by one place only
        for m in (k, k + 4):
            r0, r1 = order[m:m + 2], order[m + 2:m + 4]
            assert max(lengths[i] for i in r0) >= max(lengths[i] for i in r1)


def test_dealt_order_on_one_rank_is_the_epoch_order():
    lengths = [random.Random(i).randint(5, 300) for i in range(20)]
    assert dealt_order(lengths, 4, 1, 1, "0", True, 1) == epoch_order(lengths, 4, "0|epoch0", True)


def test_dealt_order_keeps_steps_aligned_across_epochs():
    """10 rows, 4 a step: epoch 0 is completed to 12 rows from its own start, so epoch 1 starts on a
    step boundary; the last epoch keeps its short step."""
    lengths = [random.Random(i).randint(5, 300) for i in range(10)]
    order = dealt_order(lengths, batch_size=2, world=2, grad_accum=1, key="5", group_by_length=False, epochs=2)
    first, second = epoch_order(lengths, 4, "5|epoch0", False), epoch_order(lengths, 4, "5|epoch1", False)
    assert len(order) == 12 + 10
    assert sorted(order[:12]) == sorted(list(range(10)) + first[:2])  # every row, two of them twice
    assert order[8:12] == [first[8], first[0], first[9], first[1]]  # the completed step, dealt
    assert order[12:20] == [second[k] for k in (0, 2, 1, 3, 4, 6, 5, 7)]  # epoch 1 dealt from a boundary
    assert order[20:] == second[8:]
