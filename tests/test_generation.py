import pytest
import torch

from cai.config import GenerationConfig
from cai.generation import left_pad, sample_next, window_groups

CONVS = [[{"role": "user", "content": q}] for q in
         ["hi", "How do I bake bread at home with whole wheat flour?", "2+2?", "Tell me a story about a cat.",
          "Why is the sky blue?", "ok"]]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_window_groups_split_where_a_forward_saves_more_than_it_costs():
    # one long part among short ones: 31 x 38 + 64 and 110 + 64 (1416) against 32 x 110 + 64 (3584)
    assert window_groups([38] * 31 + [110], 64) == [(0, 31), (31, 32)]
    assert window_groups([10, 10, 10], 64) == [(0, 3)]
    assert window_groups([10, 100], 64) == [(0, 1), (1, 2)]            # 238 against 264
    assert window_groups([50, 100], 64) == [(0, 2)]                    # 264 against 278
    assert window_groups([5, 6, 7], 0) == [(0, 1), (1, 2), (2, 3)]


def test_sample_next_greedy_top_p_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, gen).tolist() == [0]
    draws = torch.cat([sample_next(logits.expand(1000, 4), 1.0, 1.0, gen) for _ in range(20)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.02)
    # top_p=0.7 keeps {0.5, 0.3}: renormalised 0.625 / 0.375, never tokens 2 or 3
    draws = torch.cat([sample_next(logits.expand(1000, 4), 1.0, 0.7, gen) for _ in range(10)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0 and freq[3] == 0 and abs(freq[0] - 0.625) < 0.03


def _nucleus_probs(logits, temperature, top_p):
    """The nucleus by sorting the whole vocabulary, renormalised: what sample_next must draw from."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ranked, order = probs.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ranked)
    return kept / kept.sum(-1, keepdim=True)


@pytest.mark.parametrize("draws", [8, 1])  # 1: most rejected rows go on to the full sort
def test_top_p_draws_only_from_the_nucleus_in_its_proportions(monkeypatch, draws):
    """Peaked rows (a nucleus of one or two tokens) to flat ones (most of the vocabulary), several temperatures and
    masses: no token outside the nucleus is drawn, and each row's frequencies are the renormalised nucleus's."""
    import cai.generation

    monkeypatch.setattr(cai.generation, "NUCLEUS_DRAWS", draws)
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 8, 16)[:, None]
    gen = torch.Generator().manual_seed(1)
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.9), (1.3, 0.3)):
        expected = _nucleus_probs(logits, temperature, top_p)                                  # (16, 50)
        n = 4000
        drawn = torch.stack([sample_next(logits, temperature, top_p, gen) for _ in range(n)], 1)   # (16, n)
        freq = torch.zeros_like(expected).scatter_add_(1, drawn, torch.ones(drawn.shape)) / n
        assert (freq[expected == 0] == 0).all()
        assert (freq - expected).abs().sum(-1).max() < 0.12          # total variation ~0.05 from sampling alone


@pytest.mark.parametrize("forward_tokens", [64, 0])  # 0: each prompt length prefilled by a forward of its own
def test_greedy_batched_equals_one_by_one(tiny_generator, forward_tokens):
    """Bucketing, left padding, prefill windows and dropping finished rows must not change any row's text."""
    from cai.generation import ChatGenerator

    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, batch_size=4)
    split = ChatGenerator(tiny_generator.model, tiny_generator.tokenizer)
    split.forward_tokens = forward_tokens
    batched = split.generate_chat(CONVS, cfg, seed=0)
    single = [tiny_generator.generate_chat([c], cfg.model_copy(update={"batch_size": 1}), seed=0)[0]
              for c in CONVS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.new_tokens == 12 or c.finished for c in batched)


def test_work_counters_count_forwards_and_prompt_tokens(tiny_generator):
    """A batch takes one decoding forward per token of its longest row after the first (which the prompt's forward
    gives), and its prompt forward computes every row over the widest prompt."""
    from cai.generation import ChatGenerator

    g = ChatGenerator(tiny_generator.model, tiny_generator.tokenizer)
    g.forward_tokens = 10**6                                     # one prompt forward for the batch
    out = g.generate_ids([[10, 11, 12], [20, 21, 22, 23, 24]], GenerationConfig(max_new_tokens=7, temperature=0.0),
                         seed=0)
    assert g.decode_steps == max(c.new_tokens for c in out) - 1
    assert g.computed_tokens == 2 * 5
    g.generate_ids([[30, 31]], GenerationConfig(max_new_tokens=4, temperature=0.0), seed=0)
    assert g.computed_tokens == 2 * 5 + 2                        # counts add up across calls


def test_a_repeated_prompt_runs_once_and_scores_as_alone(tiny_generator):
    """Rows holding the same prompt share one prefill: each row's next-token log-probs are those of its prompt scored
    alone, and sampled rows still draw on their own."""
    prompts = [tiny_generator.chat_ids(CONVS[i], 512) for i in (1, 0, 1, 1, 3)]
    options = [[t] for t in range(100, 140)]
    together = tiny_generator.option_logprobs(prompts, options, batch_size=8)
    alone = torch.cat([tiny_generator.option_logprobs([p], options, batch_size=1) for p in prompts])
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the prompts do differ
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, batch_size=8)
    sampled = tiny_generator.generate_chat([CONVS[1]] * 6, cfg, seed=0)
    assert len({c.text for c in sampled}) > 1


def test_greedy_matches_plain_generate(tiny_generator):
    g = tiny_generator
    ids = g.chat_ids(CONVS[1], 4096)
    ref = g.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=10, do_sample=False, eos_token_id=sorted(g.end_ids), pad_token_id=g.pad_id)
    ours = g.generate_ids([ids], GenerationConfig(max_new_tokens=10, temperature=0.0), seed=0)[0]
    assert ours.text == g.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True).strip()


def test_sampling_is_deterministic_per_seed(tiny_generator):
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, batch_size=3)
    a = [c.text for c in tiny_generator.generate_chat(CONVS, cfg, seed=11)]
    b = [c.text for c in tiny_generator.generate_chat(CONVS, cfg, seed=11)]
    c = [c.text for c in tiny_generator.generate_chat(CONVS, cfg, seed=12)]
    assert a == b and a != c


def test_option_logprobs_match_full_forward(tiny_generator):
    g = tiny_generator
    prompts = [g.chat_ids(c, 4096) for c in CONVS[:4]]
    options = [g.tokenizer(" (A)", add_special_tokens=False)["input_ids"][-2:],
               g.tokenizer(" (B)", add_special_tokens=False)["input_ids"][-2:]]
    scores = g.option_logprobs(prompts, options, batch_size=3)
    assert scores.shape == (4, 2)
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            logp = torch.log_softmax(g.model(torch.tensor([p])).logits[0, -1].float(), -1)
        assert torch.allclose(scores[i], logp[[options[0][0], options[1][0]]], atol=1e-4)


def test_shared_prefix_reuse_gives_the_same_text(tiny_generator):
    """Few-shot turns shared by every row are run once; the text must equal a run without reuse."""
    from cai.generation import shared_prefix_len

    shots = [{"role": "user", "content": "Say something kind about rain in one short sentence please."},
             {"role": "assistant", "content": "Rain makes the gardens green and the air smell fresh."}] * 3
    convs = [shots + c for c in CONVS]
    prompts = [tiny_generator.chat_ids(c, 4096) for c in convs]
    assert shared_prefix_len(prompts, 32) > 60
    assert shared_prefix_len([[1, 2, 3], [1, 2, 4]], 1) == 2 and shared_prefix_len([[1, 2], [1, 2]], 1) == 1
    assert shared_prefix_len([[1, 2, 3], [1, 2, 4]], 3) == 0
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.0, batch_size=6)
    with_reuse = [c.text for c in tiny_generator.generate_ids(prompts, cfg, seed=0)]
    tiny_generator.min_shared_prefix = 10**9
    try:
        without = [c.text for c in tiny_generator.generate_ids(prompts, cfg, seed=0)]
    finally:
        tiny_generator.min_shared_prefix = 32
    assert with_reuse == without


def test_kept_prefixes_and_rows_score_as_a_fresh_forward(tiny_generator):
    """A generator that keeps keys/values between calls (a generation actor's) scores a prompt extending an earlier
    call's row, and one after a kept few-shot prefix, as the full forward does, and takes the reused part from the
    earlier call instead of recomputing it."""
    from cai.generation import ChatGenerator, shared_prefix_len

    g = ChatGenerator(tiny_generator.model, tiny_generator.tokenizer, reuse_kv=True)
    g.forward_tokens = 0  # prompts whose new parts differ in length prefill apart, in an order of their own
    shots = [{"role": "user", "content": "Say something kind about rain in one short sentence please."},
             {"role": "assistant", "content": "Rain makes the gardens green and the air smell fresh."}] * 2
    prompts = [g.chat_ids(shots + c, 4096) for c in CONVS]
    first = g.generate_ids(prompts, GenerationConfig(max_new_tokens=24, temperature=1.0, batch_size=4), seed=3)
    follow = g.tokenizer(" Now say it again, shorter.", add_special_tokens=False)["input_ids"]
    extended = [p + list(c.ids[:-1] if c.finished else c.ids) + follow for p, c in zip(prompts, first)]
    options = [[t] for t in range(100, 140)]
    kept = g.option_logprobs(extended, options, batch_size=4)
    P = shared_prefix_len(prompts, 32)
    assert P > 40 and g.reused_tokens >= sum(len(p) - P for p in prompts)  # each row's own prompt at least
    for i, p in enumerate(extended):
        with torch.inference_mode():
            logp = torch.log_softmax(g.model(torch.tensor([p])).logits[0, -1].float(), -1)
        assert torch.allclose(kept[i], logp[[o[0] for o in options]], atol=1e-4)
    g.forget()
    before = g.reused_tokens
    assert torch.allclose(g.option_logprobs(extended, options, batch_size=4), kept, atol=1e-4)
    assert g.reused_tokens == before  # forgotten: nothing left to reuse


def test_prompts_prefill_in_the_order_of_their_new_parts(tiny_generator):
    """A long stored prompt extended a little and a short one extended a lot: the first is longer, the second has
    more to compute, so the batch holds them the other way round; each still scores as its full forward."""
    from cai.generation import ChatGenerator

    g = ChatGenerator(tiny_generator.model, tiny_generator.tokenizer, reuse_kv=True)
    g.forward_tokens = 0
    words, other = (g.tokenizer(t, add_special_tokens=False)["input_ids"]
                    for t in (" the rain falls on the green hills", " a cat sleeps by the warm fire"))
    long_prompt, short_prompt = [1] + words * 14, [1] + words * 3
    g.generate_ids([long_prompt, short_prompt], GenerationConfig(max_new_tokens=1, temperature=0.0), seed=0)
    extended = [long_prompt + other, short_prompt + other * 6]       # the first longer, the second with more new
    orders, prefill = [], g._prefill

    def recorded(rows, extra):
        batch = prefill(rows, extra)
        orders.append(batch.order)
        return batch

    g._prefill = recorded
    options = [[t] for t in range(100, 140)]
    kept = g.option_logprobs(extended, options, batch_size=2)
    assert orders == [[1, 0]]          # sorted by length: [short, long]; by new part: [long, short]
    assert g.reused_tokens >= len(long_prompt) + len(short_prompt) - 2
    for i, p in enumerate(extended):
        with torch.inference_mode():
            logp = torch.log_softmax(g.model(torch.tensor([p])).logits[0, -1].float(), -1)
        assert torch.allclose(kept[i], logp[[o[0] for o in options]], atol=1e-4)
    # generating from them keeps each row's keys/values under its own tokens: extensions still score exactly
    out = g.generate_ids(extended, GenerationConfig(max_new_tokens=6, temperature=1.0, batch_size=2), seed=0)
    assert orders[-1] == [1, 0]
    again = [e + list(c.ids) + words for e, c in zip(extended, out)]
    before = g.reused_tokens
    kept = g.option_logprobs(again, options, batch_size=2)
    assert g.reused_tokens - before >= sum(map(len, extended))
    for i, p in enumerate(again):
        with torch.inference_mode():
            logp = torch.log_softmax(g.model(torch.tensor([p])).logits[0, -1].float(), -1)
        assert torch.allclose(kept[i], logp[[o[0] for o in options]], atol=1e-4)
