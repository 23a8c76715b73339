"""The docs cannot rot: every relative link resolves, every command line a doc marks as
runnable (a ``bpmem ...`` line in a ```bash block) parses against the CLI it documents, the
README stays short, and the GitHub Actions workflow is a complete file whose bpmem steps run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "reports" / "README.md", *DOCS]
WORKFLOW = ROOT / "docs" / "memory-check.yml"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# variables a doc's command takes from where it runs, with a value they would have there
SET_BY_THE_ENVIRONMENT = {"SLURM_ARRAY_TASK_ID": "1"}
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def _prose(text: str) -> str:
    """The page without its fenced blocks, where a ``[x](y)`` is code, not a link."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(page.read_text()).splitlines() if line.startswith("#")}


def relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """Each link of ``page`` into this checkout (not ``https:`` and the like, not in code):
    the link as written, the file it names and its #anchor."""
    links = []
    for target in LINK.findall(re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))):  # code spans too
        if not re.match(r"[a-z]+:", target):
            path_part, _, anchor = target.partition("#")
            links.append((target, (page.parent / path_part).resolve() if path_part else page, anchor))
    return links


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose file, or whose #anchor in that file, is missing."""
    broken = []
    for target, path, anchor in relative_links(page):
        if not path.exists():
            broken.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return broken


def runnable_lines(text: str) -> list[str]:
    """Every ``bpmem ...`` command in the ```bash blocks of ``text``: one per line, and one per
    part of a line joined by ``&&``, ``;`` or ``|``; comments dropped."""
    commands = []
    for language, body in FENCE.findall(text):
        if language != "bash":
            continue
        variables = dict(SET_BY_THE_ENVIRONMENT)  # and NAME="..." earlier in the block: $NAME stands for it
        for line in body.replace("\\\n", " ").splitlines():  # a trailing \ continues the line
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if assignment := re.fullmatch(r"(\w+)=(.*)", line):
                variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
                continue
            line = re.sub(r"\$\{?(\w+)\}?", lambda name, known=variables: known.get(name[1], name[0]), line)
            for part in re.split(r"&&|;|\|", line):
                if part.strip().startswith("bpmem "):
                    commands.append(part.strip())
    return commands


def parse_error(command: str) -> str | None:
    """None if ``command`` parses against bpmem's own CLI, else why not."""
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as stop:
        return f"{command!r} does not parse (exit {stop.code})"
    return None


def test_every_relative_link_resolves() -> None:
    assert DOCS, "docs/ has no pages"
    assert [broken for page in PAGES for broken in broken_links(page)] == []


def test_the_link_check_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# A heading\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#a-heading) [gone](c.md) [no anchor](b.md#nothing) `[code](x.md)`\n"
                    "```text\n[in a block](y.md)\n```\n[web](https://example.com)\n")
    assert broken_links(page, tmp_path) == ["a.md: c.md (no such file)", "a.md: b.md#nothing (no such heading)"]


def test_every_doc_page_is_reached_from_the_readme() -> None:
    linked = {path for _, path, _ in relative_links(ROOT / "README.md")}
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


def test_every_runnable_command_line_parses_against_the_cli() -> None:
    commands = [(page.relative_to(ROOT), command) for page in PAGES for command in runnable_lines(page.read_text())]
    assert len(commands) >= 10  # the README's quick start alone has five
    assert [f"{page}: {error}" for page, command in commands if (error := parse_error(command))] == []


def test_the_command_check_refuses_a_flag_the_cli_does_not_have() -> None:
    text = "```bash\nD='--depth 3'\nbpmem estimate $D --no-such-flag 1   # a comment\n```\n"
    assert runnable_lines(text) == ["bpmem estimate --depth 3 --no-such-flag 1"]
    assert parse_error(runnable_lines(text)[0]) is not None
    assert parse_error("bpmem estimate --depth 3") is None


def test_the_readme_is_short_and_holds_what_a_newcomer_needs() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for needed in ("bash .ci/main", "bash .ci/test", "## Exit codes", "bpmem estimate --model", "bpmem fit --memory",
                   "bpmem check --baseline"):
        assert needed in text, needed


def test_no_doc_links_outside_the_repository() -> None:
    """The docs carry the whole reference themselves: no link leaves the checkout."""
    outside = [f"{page.relative_to(ROOT)}: {target}" for page in PAGES
               for target, path, _ in relative_links(page) if not path.is_relative_to(ROOT)]
    assert outside == []


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text())


def test_the_workflow_is_a_complete_file_shown_whole_in_the_ci_page() -> None:
    workflow = _workflow()
    steps = workflow["jobs"]["memory"]["steps"]
    assert workflow["name"] and workflow[True] == ["push", "pull_request"]  # YAML reads `on:` as True
    assert "OWNER" not in WORKFLOW.read_text()
    assert any("download.pytorch.org/whl/cpu" in step.get("run", "") for step in steps)  # never a CUDA torch
    shown = [body for language, body in FENCE.findall((ROOT / "docs" / "ci.md").read_text()) if language == "yaml"]
    assert shown == [WORKFLOW.read_text()]


@pytest.mark.slow  # two small sweeps (ci.toml, seconds each)
def test_the_workflow_makes_its_baseline_on_the_first_run_and_checks_against_it_on_the_next(tmp_path: Path) -> None:
    """The workflow's own shell steps after setup (bpmem run, then the baseline-or-check
    step), run as the runner would, twice in one scratch checkout."""
    workflow = _workflow()
    scripts = [step["run"] for step in workflow["jobs"]["memory"]["steps"]
               if "run" in step and "pip install" not in step["run"]]
    env = {**os.environ, **workflow["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["CONFIG"] = str(ROOT / workflow["env"]["CONFIG"])  # the scratch folder has no benchmarks/
    for attempt in ("first", "second"):
        for script in scripts:
            done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, (attempt, script, done.stdout[-2000:], done.stderr[-2000:])
        if attempt == "first":
            assert "no baseline at" in done.stdout and (tmp_path / workflow["env"]["BASELINE"]).is_file()
        else:
            assert "0 regression(s)" in done.stdout, done.stdout[-2000:]
        subprocess.run(["rm", "-rf", str(tmp_path / "new")], check=True)
