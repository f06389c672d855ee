"""Bad input a new user might give, for every reader of a path in the config: one line naming the file and row.

Quick: no Ray, no model. The last test runs the real `cai` entry point on two of them.
"""
import json

import pytest

from cai.config import EvalSetConfig, PreferencesConfig, PromptSource, load_pipeline
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.judge_check import load_check_pairs
from cai.prompt_files import read_source

from .conftest import cai, error_line
from .test_constitution import BASE


def one_line(call, *args) -> str:
    with pytest.raises(CaiError) as e:
        call(*args)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def read_prompts(path, column="prompt"):
    return read_source(PromptSource(path=str(path), column=column))


# -- prompt files: what each reader gets wrong, and the line it says -------------------------------------
@pytest.mark.parametrize("name, content, expected", [
    ("nul-escape.jsonl", b'{"prompt": "fine"}\n{"prompt": "a\\u0000b"}\n',
     "{p}: row 2: column 'prompt' holds a control character (U+0000) at character 2"),
    ("esc.jsonl", b'{"prompt": "fine"}\n\n{"prompt": "red \\u001b[31m"}\n',
     "{p}: row 3: column 'prompt' holds a control character (U+001B) at character 5"),
    ("surrogate.jsonl", b'{"prompt": "half \\ud800 a pair"}\n',
     "{p}: row 1: column 'prompt' holds a lone surrogate (U+D800) at character 6"),
    ("bell.csv", b"prompt\nfine\nring \x07 ring\n",
     "{p}: row 3: column 'prompt' holds a control character (U+0007) at character 6"),
    ("c1.csv", "prompt\nfine\nnext\u0085line\n".encode(),
     "{p}: row 3: column 'prompt' holds a control character (U+0085) at character 5"),
    ("quote.csv", b'prompt\nfine\n"unterminated\nhello\nworld\n',
     "{p}:3: malformed CSV in the row starting on this line (unexpected end of data; an unterminated or "
     "stray quote?)"),
    ("blank-then-quote.csv", b'prompt\nfine\n\n\n"unterminated\n',
     "{p}:5: malformed CSV in the row starting on this line (unexpected end of data; an unterminated or "
     "stray quote?)"),
    ("stray.csv", b'prompt\nfine\n"quoted"then more\n',
     "{p}:3: malformed CSV in the row starting on this line (',' expected after '\"'; an unterminated or "
     "stray quote?)"),
    ("commas.csv", b"prompt\nfine\nHello, how are you, today?\n",
     "{p}:3: 3 fields, the header has 1 (a comma in an unquoted prompt?)"),
    ("empty.csv", b"", "{p}: file is empty"),
    ("blank.jsonl", b"\n  \n\n", "{p}: file is empty"),
    ("header-only.csv", b"prompt\n", "{p}: no prompts in file"),
    ("utf16.csv", "prompt\nhello\n".encode("utf-16"), "{p}: UTF-16 text; save it as UTF-8"),
    ("nul.csv", b"prompt\nok\nbad\x00\n", "{p}:3: NUL byte (binary data, not text)"),
])
def test_bad_text_prompt_files(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_bytes(content)
    assert one_line(read_prompts, p) == expected.format(p=p)


def test_not_parquet_empty_parquet_and_control_characters_in_parquet(tmp_path):
    import pandas as pd

    for name, content in (("text.parquet", b"prompt\nnot parquet at all\n"), ("empty.parquet", b"")):
        (tmp_path / name).write_bytes(content)
        assert one_line(read_prompts, tmp_path / name).startswith(f"{tmp_path / name}: not a readable Parquet file (")
    prompts = ["fine", "fine too", "tab\tand\nnewline ok", "not \x1f ok"]
    pd.DataFrame({"prompt": prompts}).to_parquet(tmp_path / "c.parquet")
    assert one_line(read_prompts, tmp_path / "c.parquet") == \
        f"{tmp_path / 'c.parquet'}: row 4: column 'prompt' holds a control character (U+001F) at character 5"


def test_what_is_still_read(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt,id\nfirst,a\n\"two, with a comma\nand a line\",b\n".encode())
    rows = read_prompts(tmp_path / "bom.csv")  # a spreadsheet's byte-order mark is not part of the column name
    assert [(r["id"], r["prompt"]) for r in rows] == [("a", "first"), ("b", "two, with a comma\nand a line")]
    (tmp_path / "said.csv").write_text('prompt\nHe said "hi" there\tthen left\n')
    assert [r["prompt"] for r in read_prompts(tmp_path / "said.csv")] == ['He said "hi" there\tthen left']
    # JSON strings may hold U+2028 raw: a line ends at \n only (str.splitlines would cut the row in two)
    (tmp_path / "sep.jsonl").write_text(json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False) + "\r\n")
    assert [r["prompt"] for r in read_prompts(tmp_path / "sep.jsonl")] == ["one\u2028two"]
    (tmp_path / "other.jsonl").write_text(json.dumps({"prompt": "fine", "note": "\x00 in a column not read"}) + "\n")
    assert [r["prompt"] for r in read_prompts(tmp_path / "other.jsonl")] == ["fine"]


# -- every kind of path the config takes, given a folder (or a file where a folder belongs) -------------
def test_a_folder_where_a_file_belongs(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert one_line(load_constitution, folder) == f"{folder}: is a folder, not a YAML file"
    assert one_line(load_pipeline, folder) == f"{folder}: is a folder, not a YAML file"
    assert one_line(load_check_pairs, str(folder)) == f"{folder}: is a folder; judge-check pairs are one .jsonl file"
    # prompt sources, eval sets and given pairs may be `datasets` folders: any other folder is named as not one
    assert one_line(read_prompts, folder) == f"{folder}: not a `datasets` folder (FileNotFoundError)"


def test_eval_sets_and_given_pairs_are_checked_like_prompt_files(tmp_path):
    from cai.stages.evaluate import read_set
    from cai.stages.preferences import given_helpful_pairs

    (tmp_path / "set.parquet").write_text("not parquet")
    s = EvalSetConfig(name="mine", kind="harmful", path=str(tmp_path / "set.parquet"))
    assert one_line(read_set, s, None).startswith(f"{tmp_path / 'set.parquet'}: not a readable Parquet file (")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" +
                                          json.dumps({"prompt": "p", "chosen": "c", "rejected": "r\x0c"}) + "\n")
    cfg = PreferencesConfig(helpful_pairs=PromptSource(path=str(tmp_path / "pairs.jsonl")))
    assert one_line(given_helpful_pairs, cfg) == \
        f"{tmp_path / 'pairs.jsonl'}: row 2: column 'rejected' holds a control character (U+000C) at character 2"


def test_output_dir_that_is_a_file(tmp_path):
    from cai.runner import claim_output_dir, stage_status

    (tmp_path / "out").write_text("a file")
    assert one_line(claim_output_dir, tmp_path / "out", "x") == \
        f"output_dir {tmp_path / 'out'}: is a file, not a folder"
    assert one_line(stage_status, tmp_path / "out") == f"{tmp_path / 'out'}: is a file, not a run's output folder"


# -- judge-check pairs and constitutions ------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (b'{"prompt": "p", "better": "b", "worse": "w"}\n{"prompt": "p", "better": "b", "worse": "w\\u0000"}\n',
     "{p}: row 2: column 'worse' holds a control character (U+0000) at character 2"),
    (b'{"prompt": "p", "better": "caf\xe9", "worse": "w"}\n', "{p}:1: not UTF-8 (byte 30)"),
    (b'["prompt", "better", "worse"]\n', "{p}:1: expected a JSON object per line"),
    (b"", "{p}: file is empty"),
])
def test_bad_judge_check_pairs(tmp_path, content, expected):
    p = tmp_path / "pairs.jsonl"
    p.write_bytes(content)
    assert one_line(load_check_pairs, str(p)) == expected.format(p=p)


@pytest.mark.parametrize("text, expected", [
    (BASE.replace("revision: Remove harm.", 'revision: "Remove\\0 harm."'),
     "{p}:6: key 'critique_revision.0.revision': Value error, holds a control character (U+0000) at character 7"),
    (BASE.replace("Which is less harmful?", '"Which is \\x7f less harmful?"'),
     "{p}:9: key 'preference.0.question': Value error, holds a control character (U+007F) at character 10"),
    (BASE.replace("prompt: hi", "prompt: h\x01i"),
     "{p}:13: malformed YAML: unacceptable character #x0001: special characters are not allowed"),
])
def test_constitution_text_with_control_characters(tmp_path, text, expected):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert one_line(load_constitution, p) == expected.format(p=p)


# -- what the user sees from the real command line ---------------------------------------------------------
def test_cli_prints_one_line_and_exits_2(tmp_path):
    folder = tmp_path / "constitution"
    folder.mkdir()
    proc = cai("constitution", "check", str(folder), check=False)
    assert error_line(proc) == f"cai: error: {folder}: is a folder, not a YAML file"
    assert proc.stderr.strip() == error_line(proc) and proc.stdout == ""
    (tmp_path / "out").write_text("not a run")
    proc = cai("status", str(tmp_path / "out"), check=False)
    assert error_line(proc) == f"cai: error: {tmp_path / 'out'}: is a file, not a run's output folder"
