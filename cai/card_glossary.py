"""What the cards say about each stage, model, data file, column and headline number (cai/cards.py renders them).

Text only: the cards take columns, types and row counts from the files themselves, so a file or column not
named here still gets its row in a card, with no description.
"""
from __future__ import annotations

PAPER = "Constitutional AI: Harmlessness from AI Feedback (Bai et al. 2022, arXiv:2212.08073)"

STAGES = {
    "prompts": "The red-team and helpfulness prompt sets: shipped seeds or user files, exact duplicates dropped, "
               "plus prompts the policy wrote from a few seeds (near duplicates dropped) when expansion is on (§3.2).",
    "critique_revise": "SL-CAI data (§3.1): per red-team prompt, the policy's answer, then rounds of critique and "
                       "revision under principles drawn from the constitution; the revisions, with helpfulness "
                       "answers mixed in, as supervised fine-tuning data.",
    "sft": "The supervised stage's inputs and records: the data mix trained on, tokenised, and the loss per step.",
    "preferences": "RL-CAI data (§4.1): pairs of responses from the SFT model, labelled by the feedback model "
                   "under a principle drawn from the constitution, both option orders averaged into a soft label.",
    "reward_model": "The preference model's data, tokenised as it reads it (a seeded held-out split), and the "
                    "loss per step.",
    "ppo": "The RL prompts, and PPO's records: metrics per step and sampled responses with their scores.",
    "dpo": "The pairs DPO trained on (confident AI labels, both responses finished) and the loss per step.",
    "evaluate": "Every checkpoint's answer to every held-out prompt, with its preference-model score and refusal "
                "verdict (the numbers built from them are in eval.json and report.html).",
}

MODELS = {
    "sft": "the SL-CAI policy: fine-tuned on revisions of its own answers, made under the constitution's critique "
           "principles, plus helpfulness answers (§3.1)",
    "reward_model": "the preference model: a scalar head trained with a soft Bradley-Terry loss on AI preference "
                    "labels made under the constitution's preference principles (§4.1-4.2)",
    "ppo": "the RL-CAI policy: PPO against the preference model, with a per-token KL penalty to the SFT model (§4.2)",
    "dpo": "the RL-CAI policy by DPO (Rafailov et al. 2023) on the confident AI preference labels, the SFT model "
           "as reference",
}

FILES = {
    "prompts/red_team.jsonl": "Red-team prompts: requests meant to draw out harmful answers.",
    "prompts/helpful.jsonl": "Helpfulness prompts: everyday questions and tasks.",
    "critique_revise/trace.jsonl": "Every red-team prompt's full trace: the initial answer and each round's "
                                   "principle, critique and revision.",
    "critique_revise/sft.jsonl": "The SFT data: revisions (all rounds, or the last) plus helpfulness answers.",
    "critique_revise/sft_revisions.jsonl": "The revision rows of sft.jsonl alone.",
    "critique_revise/sft_helpful.jsonl": "The helpfulness rows of sft.jsonl alone.",
    "sft/train.jsonl": "The mix trained on: every revision row plus `sft.helpful_ratio` helpfulness rows per "
                       "revision row, shuffled.",
    "sft/train_ids.jsonl": "train.jsonl tokenised with the chat template, cut to `sft.train.max_length`.",
    "preferences/preferences.jsonl": "Labelled pairs: the side the feedback model prefers is `chosen`.",
    "reward_model/train.jsonl": "Training pairs, tokenised as the preference model reads them.",
    "reward_model/eval.jsonl": "Held-out pairs (`reward_model.eval_fraction`), tokenised the same way.",
    "ppo/prompts.jsonl": "The prompts PPO samples its rollouts from.",
    "ppo/metrics.jsonl": "One record per PPO step.",
    "ppo/samples.jsonl": "A few rollouts every `ppo.sample_every` steps, with their scores.",
    "dpo/train.jsonl": "The pairs DPO trained on.",
    "evaluate/answers.jsonl": "One row per checkpoint, prompt set and prompt.",
}

STEP_COLUMNS = {"step": "optimizer step (1-based)", "total": "steps in the run", "loss": "training loss",
                "learning_rate": "learning rate at this step", "grad_norm": "gradient norm before clipping"}

COLUMNS: dict[str, dict[str, str]] = {
    "*": {"id": "row id, stable across reruns", "source": "where the row came from",
          "finished": "whether the completion ended with an end-of-turn token (cut at max_new_tokens if not)"},
    "prompts": {"prompt": "the prompt text",
                "source": "the file it came from (builtin:... for shipped seeds), or `generated`"},
    "critique_revise": {
        "prompt": "the red-team prompt (trace) or the conversation before the answer (SFT rows)",
        "completion": "the assistant's answer: a revision or a helpfulness answer",
        "initial": "the policy's first answer", "initial_finished": "whether it ended with an end-of-turn token",
        "rounds": "per round: principle id, critique request, critique, revision request, revision, whether it "
                  "finished",
        "model": "the policy that wrote it", "seed": "the run's seed", "shard_seed": "the sampling seed of its shard",
        "constitution": "the constitution's name and the hash of the parts this stage read"},
    "sft": {"prompt": "the conversation before the answer", "completion": "the answer trained on",
            "input_ids": "token ids (chat template applied)", "completion_mask": "1 on the tokens the loss falls on",
            **STEP_COLUMNS},
    "preferences": {
        "prompt": "the conversation before the responses", "chosen": "the preferred response",
        "rejected": "the other response", "p_chosen": "the soft label: P(chosen is better), >= 0.5",
        "aspect": "harmless or helpful", "principle": "the preference principle the label was asked under",
        "p_a": "P(option A) in each option order", "logprobs": "log-probabilities of the A and B tokens, per order",
        "source": "`ai` (labelled here) or `given` (a user's comparison)",
        "chosen_finished": "whether the chosen response ended with an end-of-turn token",
        "rejected_finished": "whether the rejected response ended with an end-of-turn token"},
    "reward_model": {"chosen": "token ids of the conversation ending in the chosen response",
                     "rejected": "token ids of the conversation ending in the rejected response",
                     "p": "the soft label P(chosen is better)", **STEP_COLUMNS},
    "ppo": {"prompt": "the prompt text", "response": "the sampled response", "score": "its raw reward",
            "reward_mean": "mean raw reward of the rollouts", "reward_std": "its standard deviation",
            "score_mean": "mean normalised score", "kl": "KL to the SFT model, summed over response tokens",
            "kl_coef": "the KL coefficient (beta) after this step", "response_length": "mean response tokens",
            "eos_rate": "share of responses that ended with end-of-turn", "empty_rate": "share of empty responses",
            "policy_loss": "clipped policy loss", "value_loss": "clipped value loss", "entropy": "mean token entropy",
            "clip_frac": "share of policy ratios clipped", "approx_kl": "approximate KL between update and rollout",
            "lr": "policy learning rate", "skipped_steps": "steps skipped for non-finite losses so far",
            "step_time": "seconds for the step", "warnings": "collapse signals seen at this step",
            "step": "PPO step (1-based)"},
    "dpo": {"prompt": "the conversation before the responses", "chosen": "the preferred response",
            "rejected": "the other response", **STEP_COLUMNS},
    "evaluate": {"checkpoint": "the checkpoint's label (base, sft, policy, ppo@N, ...)",
                 "set": "the prompt set's name", "kind": "harmful, helpful or borderline", "prompt": "the prompt",
                 "answer": "the checkpoint's answer", "tokens": "new tokens, the end-of-turn included",
                 "pm_score": "the preference model's raw score (null without one)",
                 "p_refuse": "the feedback model's P(the answer refuses), harmful and borderline sets (null "
                             "elsewhere or when not judged)"},
}

METRICS = {
    "train_loss": "mean training loss over the run", "final_loss": "mean loss of the last 5 steps",
    "steps": "optimizer steps", "tokens": "tokens trained on", "rows": "training rows", "pairs": "training pairs",
    "train_pairs": "training pairs", "eval_pairs": "held-out pairs",
    "eval_agreement": "held-out soft agreement with the AI labels (higher is better; 0.5 is chance)",
    "eval_ece": "held-out expected calibration error of sigma(r_chosen - r_rejected)",
    "reward_mean": "mean score on its data (PPO normalises with it)", "reward_std": "score standard deviation",
    "last_reward_mean": "mean raw reward of the last step's rollouts",
    "last_kl": "KL to the SFT model at the last step",
    "last_response_length": "mean response tokens at the last step",
    "last_eos_rate": "share of the last step's responses that ended with end-of-turn",
    "skipped_steps": "steps skipped for non-finite losses",
    "kl": "KL to the SFT model at this step", "response_length": "mean response tokens at this step",
    "eos_rate": "share of this step's responses that ended with end-of-turn",
    "train_accuracy": "share of pairs with the chosen side's implicit reward higher, last 5 logged steps",
    "train_margin": "mean implicit reward margin (chosen - rejected), last 5 logged steps",
}

HEADLINE = {  # the summary keys a model card shows, in order
    "sft": ("train_loss", "steps", "tokens", "rows"),
    "reward_model": ("eval_agreement", "eval_ece", "final_loss", "eval_pairs", "train_pairs", "reward_mean",
                     "reward_std", "steps"),
    "ppo": ("last_reward_mean", "last_kl", "last_response_length", "last_eos_rate", "steps", "skipped_steps"),
    "dpo": ("train_accuracy", "train_margin", "train_loss", "steps", "pairs"),
}
