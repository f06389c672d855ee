"""Rule-based judges for tests (evaluate.judge.function: 'tests.planted:NAME'), the counterpart of the planted
rewards in cai/rewards.py."""


def prefers_low_token_ids(prompts, first, second, first_ids, second_ids):
    """P(first is better): 1 when its mean token id is lower, 0 when higher, 1/2 on a tie. It disagrees with
    cai.rewards:mean_token_id by construction, as a true preference disagrees with an exploited reward."""
    def mean(ids):
        return sum(ids) / len(ids) if ids else 0.0

    return [0.5 if mean(a) == mean(b) else float(mean(a) < mean(b)) for a, b in zip(first_ids, second_ids)]
