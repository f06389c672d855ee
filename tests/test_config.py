from pathlib import Path

import pytest

from cai.config import PipelineConfig, dump_config, load_pipeline
from cai.errors import CaiError

from .conftest import REPO, cai, error_line

GOOD = """name: t
output_dir: runs/t
policy:
  name: smollm2-135m-instruct
critique_revise:
  rounds: 2
  generation:
    max_new_tokens: 16
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_values_defaults_and_absolute_paths(tmp_path):
    cfg = load_pipeline(write(tmp_path, GOOD))
    assert cfg.critique_revise.rounds == 2
    assert cfg.critique_revise.generation.max_new_tokens == 16
    assert cfg.critique_revise.generation.temperature == 1.0  # default from the one place
    assert cfg.critique_revise.few_shot == 5
    assert Path(cfg.output_dir).is_absolute() and Path(cfg.constitution).is_absolute()
    assert cfg.policy.name == "smollm2-135m-instruct"  # an alias stays an alias


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_pipeline(write(tmp_path, GOOD), ["critique_revise.rounds=3", "seed=7",
                                                "critique_revise.generation.temperature=0.5",
                                                "ray.address=10.0.0.1:6379"])
    assert (cfg.critique_revise.rounds, cfg.seed, cfg.critique_revise.generation.temperature) == (3, 7, 0.5)
    assert cfg.ray.address == "10.0.0.1:6379"


@pytest.mark.parametrize("text, expected", [
    (GOOD + "critque_revise: {}\n", "p.yaml:9: key 'critque_revise': unknown key"),
    (GOOD.replace("rounds: 2", "rounds: two"), "p.yaml:6: key 'critique_revise.rounds': Input should be a valid integer"),
    (GOOD.replace("rounds: 2", "rounds: 0"), "p.yaml:6: key 'critique_revise.rounds': Input should be greater than or equal to 1"),
    (GOOD.replace("max_new_tokens: 16", "max_new_tokens: 16\n    top_k: 3"), "p.yaml:9: key 'critique_revise.generation.top_k': unknown key"),
    (GOOD.replace("name: t\n", ""), "key 'name': missing required key"),
    ("name: [unclosed\n", "p.yaml:2: malformed YAML"),
    ("", "p.yaml: file is empty"),
    ("- a\n- b\n", "expected a mapping"),
    (GOOD + "dpo: {train: {activation_checkpointing: 2}}\n",
     "p.yaml:9: key 'dpo.train': Value error, activation_checkpointing: trl's DPOTrainer recomputes every layer"),
    (GOOD + "sft: {train: {bf16: maybe}}\n", "p.yaml:9: key 'sft.train.bf16': Value error, expected true, false or auto, "
     "got 'maybe'"),
])
def test_bad_config_is_one_line_naming_file_line_key(tmp_path, text, expected):
    with pytest.raises(CaiError) as e:
        load_pipeline(write(tmp_path, text))
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override(tmp_path):
    with pytest.raises(CaiError, match=r"key 'critique_revise.rounds': Input should be a valid integer"):
        load_pipeline(write(tmp_path, GOOD), ["critique_revise.rounds=abc"])
    with pytest.raises(CaiError, match="unknown key"):
        load_pipeline(write(tmp_path, GOOD), ["critique_revise.nope=1"])
    cfg = load_pipeline(write(tmp_path, GOOD), ["ppo.train.bf16=false", "sft.train.bf16=auto"])
    assert (cfg.ppo.train.bf16, cfg.sft.train.bf16, cfg.dpo.train.bf16) == (False, "auto", "auto")
    with pytest.raises(CaiError, match="expected key=value"):
        load_pipeline(write(tmp_path, GOOD), ["critique_revise.rounds"])


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_every_shipped_pipeline_loads(name):
    cfg = load_pipeline(REPO / "pipelines" / name)
    assert isinstance(cfg, PipelineConfig)
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg  # the dump round-trips


def test_cai_config_prints_resolved_config_with_override():
    proc = cai("config", "pipelines/tiny.yaml", "critique_revise.rounds=3")
    assert "rounds: 3" in proc.stdout and "max_new_tokens: 8" in proc.stdout
    assert proc.stdout == dump_config(load_pipeline(REPO / "pipelines/tiny.yaml", ["critique_revise.rounds=3"]))


def test_cai_config_error_is_one_line():
    line = error_line(cai("config", "pipelines/tiny.yaml", "critique_revise.bogus=1", check=False))
    assert "key 'critique_revise.bogus': unknown key" in line


@pytest.mark.parametrize("override, message", [
    ("ppo.generation.top_p=0.9", "top_p must be 1.0 for PPO"),
    ("ppo.generation.temperature=0", "temperature must be > 0 for PPO"),
    ("ppo.rollout_backend=vllm", "key 'ppo.rollout_backend': Input should be 'cai' or 'hf'"),
    ("ppo.train.warmup_steps=-1", "key 'ppo.train.warmup_steps': Input should be greater than or equal to 0"),
])
def test_ppo_rejects_what_it_cannot_train_on(override, message):
    with pytest.raises(CaiError, match=message):
        load_pipeline(REPO / "pipelines/tiny.yaml", [override])


@pytest.mark.parametrize("pipeline", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_every_shipped_pipeline_validates(pipeline):
    cfg = load_pipeline(REPO / "pipelines" / pipeline, [])
    assert cfg.name and cfg.output_dir


def test_cluster_example_fits_two_nodes_of_eight_gpus():
    from cai.cluster import Resources
    from cai.config import feedback_model
    from cai.runner import planned_workers
    from cai.stages import ORDER

    cfg = load_pipeline(REPO / "pipelines/cluster-8b-70b.yaml", [])
    needs = planned_workers(cfg, [s for s in ORDER if s != "dpo"])
    assert max(count * each.gpus for count, each in needs) == 16
    assert Resources.of_generation(cfg.ray, feedback_model(cfg)) == (4, Resources(4.0, 4.0, False, "ray"))
