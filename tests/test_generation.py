import torch

from cai.config import GenerationConfig
from cai.generation import left_pad, sample_next

CONVS = [[{"role": "user", "content": q}] for q in
         ["hi", "How do I bake bread at home with whole wheat flour?", "2+2?", "Tell me a story about a cat.",
          "Why is the sky blue?", "ok"]]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


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


def _full_sort_sample(logits, temperature, top_p, gen):
    """The nucleus by sorting the whole vocabulary: what sample_next must draw."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return order.gather(-1, torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)).squeeze(-1)


def test_top_p_among_candidates_draws_what_a_full_sort_draws(monkeypatch):
    """Peaked rows (nucleus within the first tier of candidates), wider ones (the second) and flat ones (sorted in
    full) in one batch."""
    import cai.generation

    monkeypatch.setattr(cai.generation, "NUCLEUS_CANDIDATES", (32, 400))
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 12, 64)[:, None]
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.9), (1.3, 0.5)):
        ours, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for _ in range(20):
            assert torch.equal(sample_next(logits, temperature, top_p, ours),
                               _full_sort_sample(logits, temperature, top_p, ref))


def test_greedy_batched_equals_one_by_one(tiny_generator):
    """Bucketing, left padding and dropping finished rows must not change any row's text."""
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, batch_size=4)
    batched = tiny_generator.generate_chat(CONVS, cfg, seed=0)
    single = [tiny_generator.generate_chat([c], cfg.model_copy(update={"batch_size": 1}), seed=0)[0]
              for c in CONVS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.new_tokens == 12 or c.finished for c in batched)


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
