"""The run's report: <output_dir>/report.html and report.json, with every section of `cai eval`'s page
(evaluate/eval.json) and one section per kind of audit holding each audit committed below <output_dir>/audit/
(redteam.json, mwe.json, arca.json; hidden folders such as work and temporary ones are skipped). It is rebuilt
from those files whenever one of them is committed: at the end of the evaluate stage, and by `cai redteam`,
`cai mwe` and `cai audit arca` when they write inside <output_dir>/audit/. What is missing is simply absent.
Each command's own page is left as it is.

report.json is eval.json's content plus, under `redteam`, `mwe` and `arca`, a dict from each audit's folder
(relative to audit/, e.g. "mwe/power-seeking" or "redteam/adversarial") to its JSON file's content; every number
on the page is marked with its path in report.json (cai/report.py's rule). An audit is drawn by its own section
builder on the page its command renders, then its data-path attributes are re-rooted under its key and folder and
its images are pointed at plots/<its folder, "/" and "." as "-">/, where it drew them, so that no two parts share
a plot file.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from html import unescape
from pathlib import Path

from cai.report import SECTIONS, Section, esc, path_attr, write_report


@dataclass(frozen=True)
class Audit:
    key: str     # report.json's key, and the key of its section in cai/report.py's SECTIONS
    file: str    # the JSON its command commits
    whole: bool  # the file is the page its own report renders (mwe.json); else that page is {key: the file}


AUDITS = (Audit("redteam", "redteam.json", False), Audit("mwe", "mwe.json", True), Audit("arca", "arca.json", False))
EVAL = Path("evaluate") / "eval.json"
REPORT, REPORT_JSON = "report.html", "report.json"
PATH_ATTR = re.compile(r"data-path='([^']*)'")


def found_audits(output_dir: Path, audit: Audit) -> tuple[dict[str, object], dict[str, str]]:
    """-> ({folder relative to audit/: its JSON}, {folder: why it cannot be read}), in path order."""
    root = output_dir / "audit"
    found, broken = {}, {}
    for path in sorted(root.rglob(audit.file)) if root.is_dir() else []:
        rel = path.parent.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # work folders, folders being committed
            continue
        try:
            found[rel.as_posix()] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            broken[rel.as_posix()] = f"{path}: {e}"
    return found, broken


def rebase(body: str, prefix: tuple[str, ...], drop: int, plots: str) -> str:
    """A section's HTML drawn on a sub-document, moved into report.json: each data-path loses its first `drop`
    keys and gains `prefix`; each image is looked for in plots/<plots>/. Text on the page is escaped (no quote
    survives), so only the attributes that cai/report.py writes can match."""
    def move(m: re.Match) -> str:
        path = json.loads(unescape(m.group(1)))
        return f"data-path='{path_attr([*prefix, *path[drop:]])}'"

    return PATH_ATTR.sub(move, body).replace('src="plots/', f'src="plots/{plots}/')


def audit_section(audit: Audit, own: Section, broken: dict[str, str]) -> Section:
    """The section showing every audit of one kind, each under its folder's name, drawn by `own` (its command's
    section); an audit that cannot be read or drawn is named with the reason, and the rest is still shown."""
    def build(data: dict, plots: Path) -> str:
        parts, folders = [], set()
        for rel in sorted({*data[audit.key], *broken}):
            head = f"<h3><code>audit/{esc(rel)}</code></h3>"
            if rel in broken:
                parts.append(f"{head}<p>Not shown: {esc(broken[rel])}.</p>")
                continue
            folder = re.sub(r"[^A-Za-z0-9_-]", "-", rel)  # "." too: rel may be "." itself
            while folder in folders:  # "a/b" and "a-b" would share one
                folder += "_"
            folders.add(folder)
            (plots / folder).mkdir(parents=True, exist_ok=True)
            page = data[audit.key][rel] if audit.whole else {audit.key: data[audit.key][rel]}
            try:
                body = own.build(page, plots / folder)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                body = f"<p>Not shown: {audit.file} is not in the layout this report reads ({e!r}).</p>"
            parts.append(head + rebase(body, (audit.key, rel), 0 if audit.whole else 1, folder))
            if not any((plots / folder).iterdir()):
                (plots / folder).rmdir()
        return "".join(parts)

    return Section(own.id, own.title, audit.key, build)


def gather(output_dir: Path) -> tuple[dict, list[Section]] | None:
    """-> (report.json's content, the sections to draw), or None when the run has nothing to show yet."""
    output_dir = Path(output_dir)
    data: dict = {}
    sections = []
    if (output_dir / EVAL).is_file():
        data = json.loads((output_dir / EVAL).read_text(encoding="utf-8"))
        sections = [s for s in SECTIONS if s.key not in {a.key for a in AUDITS}]
    for audit in AUDITS:
        found, broken = found_audits(output_dir, audit)
        if found or broken:
            data[audit.key] = found
            sections.append(audit_section(audit, next(s for s in SECTIONS if s.key == audit.key), broken))
    if not data:
        return None
    try:
        name = json.loads((output_dir / "cai-run.json").read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = output_dir.name
    data.update(title=f"cai run: {name}", created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return data, sections


@contextmanager
def _locked(output_dir: Path):
    """One rebuild at a time per run, so that the last one written has read every file committed before it."""
    with open(output_dir / ".report.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_run_report(output_dir: str | Path) -> Path | None:
    """Rebuild <output_dir>/report.html, report.json and plots/ from the committed JSON files; -> the page, or
    None when there is nothing to show. Built beside, then moved in: the page is the old one or the new one."""
    out = Path(output_dir)
    with _locked(out):
        gathered = gather(out)
        if gathered is None:
            return None
        data, sections = gathered
        tmp, old = out / f".report.tmp{os.getpid()}", out / f".plots.old{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_report(data, tmp, sections)
        (tmp / REPORT_JSON).write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        if (out / "plots").exists():
            os.replace(out / "plots", old)
        os.replace(tmp / "plots", out / "plots")
        os.replace(tmp / REPORT_JSON, out / REPORT_JSON)
        os.replace(tmp / REPORT, out / REPORT)  # the page last
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out / REPORT


def update_run_report(folder: str | Path, output_dir: str | Path | None = None) -> Path | None:
    """After an audit committed into `folder`: rebuild the run's report when `folder` lies in <output_dir>/audit/.
    Without `output_dir` (`cai audit arca` reads no pipeline), the run is the folder above the nearest `audit`
    folder holding `folder`, when it holds a run's cai-run.json. -> the page, or None when not rebuilt."""
    from cai.runner import OWNER

    folder = Path(folder).resolve()
    if output_dir is None:
        output_dir = next((p.parent for p in (folder, *folder.parents)
                           if p.name == "audit" and (p.parent / OWNER).is_file()), None)
    if output_dir is None or not folder.is_relative_to(Path(output_dir).resolve() / "audit"):
        return None
    page = write_run_report(Path(output_dir).resolve())
    if page:
        print(f"run report: {page}")
    return page
