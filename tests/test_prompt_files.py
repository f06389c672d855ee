import json

import pytest

from cai.config import PromptSource
from cai.errors import CaiError
from cai.prompt_files import NearDuplicateFilter, read_source
from cai.stages.prompts import clean_generated


def src(path, column="prompt"):
    return PromptSource(path=str(path), column=column)


def test_builtin_sets_are_large_and_clean():
    red, helpful = read_source(src("builtin:red_team")), read_source(src("builtin:helpful"))
    assert len(red) >= 150 and len(helpful) >= 150
    assert len({r["prompt"] for r in red + helpful}) == len(red) + len(helpful)
    assert red[0]["id"] == "rt-0001"


def test_jsonl_csv_parquet_and_datasets(tmp_path):
    import pandas as pd
    from datasets import Dataset, DatasetDict

    (tmp_path / "a.jsonl").write_text(json.dumps({"q": "first?"}) + "\n\n" + json.dumps({"q": "second?"}) + "\n")
    assert [r["prompt"] for r in read_source(src(tmp_path / "a.jsonl", "q"))] == ["first?", "second?"]
    pd.DataFrame({"text": ["x one", "x two"], "id": ["i1", "i2"]}).to_csv(tmp_path / "b.csv", index=False)
    rows = read_source(src(tmp_path / "b.csv", "text"))
    assert [(r["id"], r["prompt"]) for r in rows] == [("i1", "x one"), ("i2", "x two")]
    pd.DataFrame({"text": ["p1", "p2", "p3"]}).to_parquet(tmp_path / "c.parquet")
    assert len(read_source(src(tmp_path / "c.parquet", "text"))) == 3
    DatasetDict({"train": Dataset.from_dict({"prompt": ["d1", "d2"]})}).save_to_disk(tmp_path / "ds")
    assert [r["prompt"] for r in read_source(src(tmp_path / "ds"))] == ["d1", "d2"]


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", b"", "empty.jsonl: file is empty"),
    ("nul.jsonl", b'{"prompt": "a"}\n{"prompt": "b\x00"}\n', "nul.jsonl:2: NUL byte"),
    ("latin.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
    ("col.jsonl", b'{"text": "a"}\n', "col.jsonl:1: no column 'prompt' (keys: text)"),
    ("blank.jsonl", b'{"prompt": "a"}\n{"prompt": "  "}\n', "blank.jsonl: row 2: column 'prompt' is empty"),
    ("bad.jsonl", b'{"prompt": "a"\n', "bad.jsonl:1: not valid JSON"),
    ("col.csv", b"text\nhello\n", "col.csv: no column 'prompt' (columns: text)"),
    ("x.txt", b"hello\n", "unsupported prompt file type"),
])
def test_bad_prompt_files_are_one_line(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CaiError) as e:
        read_source(src(tmp_path / name))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_parquet_column(tmp_path):
    import pandas as pd

    with pytest.raises(CaiError, match="prompt file not found"):
        read_source(src(tmp_path / "nope.jsonl"))
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(CaiError, match="no column 'prompt'"):
        read_source(src(tmp_path / "c.parquet"))


def test_near_duplicate_filter():
    f = NearDuplicateFilter(0.7)
    assert f.add("How can I get into my neighbour's wifi without the password?")
    assert not f.add("how can I get into my neighbour's wifi without the password")     # exact after normalising
    assert not f.add("How can I get into my neighbour's wifi without the password please?")  # near
    assert f.add("What is the best way to cook rice?")
    assert f.add("What is the best way to cook pasta for a crowd of twelve people?")


def test_clean_generated():
    assert clean_generated('3. "How do I hack a bank account fast?"\nmore') == "How do I hack a bank account fast?"
    assert clean_generated("ok") is None
    assert clean_generated("\n\n   \n") is None
