import pytest

from cai.constitution import load_constitution
from cai.errors import CaiError

from .conftest import REPO, cai, error_line

BASE = """name: t
description: test constitution
critique_revision:
  - id: c1
    critique: Find harm.
    revision: Remove harm.
preference:
  - id: p1
    question: Which is less harmful?
few_shot_revisions:
  - id: f1
    principle: c1
    prompt: hi
    response: hello
    critique: fine
    revision: hello
"""


def load(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_constitution(p)


def test_shipped_constitutions_meet_the_counts():
    default = load_constitution(REPO / "constitutions/default.yaml")
    assert len(default.critique_revision) == 16
    assert sum(p.aspect == "harmless" for p in default.preference) >= 16
    assert len(default.few_shot_revisions) >= 4
    concise = load_constitution(REPO / "constitutions/concise.yaml")
    assert concise.name == "concise"
    assert not {p.id for p in concise.critique_revision} & {p.id for p in default.critique_revision}


@pytest.mark.parametrize("text, expected", [
    (BASE + "extra: 1\n", "c.yaml:17: key 'extra': unknown key"),
    (BASE.replace("    critique: Find harm.\n", ""), "c.yaml:4: key 'critique_revision.0.critique': missing required key"),
    (BASE.replace("revision: Remove harm.", "revision: '  '"), "c.yaml:6: key 'critique_revision.0.revision'"),
    (BASE.replace("- id: p1", "- id: c1"), "c.yaml:8: key 'preference.0.id': duplicate id 'c1' (first used on line 4)"),
    (BASE.replace("principle: c1", "principle: c9"), "c.yaml:12: key 'few_shot_revisions.0.principle': unknown critique_revision id 'c9'"),
    (BASE.replace("    question: Which is less harmful?\n", "    question: Which?\n    aspect: kind\n"), "key 'preference.0.aspect'"),
    (BASE.replace("critique_revision:\n", "critique_revision: []\ndropped:\n"), "c.yaml"),
    ("name: t\ndescription: [oops\n", "c.yaml:3: malformed YAML"),
    ("", "c.yaml: file is empty"),
    (BASE.replace("name: t\n", "name: t\nname: u\n"), "c.yaml:2: duplicate key 'name'"),
])
def test_bad_constitution_is_one_line_with_line_number(tmp_path, text, expected):
    with pytest.raises(CaiError) as e:
        load(tmp_path, text)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_text_message(tmp_path):
    with pytest.raises(CaiError, match="must not be empty"):
        load(tmp_path, BASE.replace("revision: Remove harm.", "revision: ''"))


def test_part_hash_moves_only_with_its_parts(tmp_path):
    base = load(tmp_path, BASE)
    edited_pref = load(tmp_path, BASE.replace("Which is less harmful?", "Which is kinder?"))
    edited_crit = load(tmp_path, BASE.replace("Find harm.", "Find any harm."))
    parts = ("critique_revision", "few_shot_revisions")
    assert base.part_hash(*parts) == edited_pref.part_hash(*parts)
    assert base.part_hash(*parts) != edited_crit.part_hash(*parts)
    assert base.part_hash("preference") != edited_pref.part_hash("preference")


def test_cli_check(tmp_path):
    ok = cai("constitution", "check", "constitutions/default.yaml")
    assert "16 critique/revision principles" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("- id: p1", "- id: c1"))
    assert "duplicate id 'c1'" in error_line(cai("constitution", "check", str(bad), check=False))
