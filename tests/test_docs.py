"""The documentation works: the README's examples run, its commands take the flags it shows,
the pages keep to their length limits, and every relative link leads to a file."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

import mmllm

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
RESEARCH = DOCS / "research"
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def guide_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if RESEARCH not in p.parents)


def research_pages() -> list[Path]:
    return sorted(RESEARCH.rglob("*.md"))


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


# ---------------------------------------------------------------------------- limits


def test_readme_is_short_and_keeps_the_ci_test_command():
    text = README.read_text()
    assert line_count(README) <= 120
    assert TEST_COMMAND in text.splitlines() or any(TEST_COMMAND == b.strip() for b in fenced(text, "bash"))


def test_guide_pages_keep_to_their_limits():
    pages = guide_pages()
    assert DOCS / "index.md" in pages
    too_long = {p.name: line_count(p) for p in pages if line_count(p) > 400}
    assert not too_long, f"pages over 400 lines: {too_long}"
    total = sum(line_count(p) for p in pages)
    assert total <= 2500, f"the guide has {total} lines (limit 2500)"


def test_research_record_keeps_to_its_limit():
    total = sum(line_count(p) for p in research_pages())
    assert 0 < total <= 800, f"docs/research has {total} lines (limit 800)"


def test_session_means_only_a_chat_session():
    allowed = ("chat", "gradio", "client", "browser", "user")
    for path in [README, *DOCS.rglob("*.md")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bsessions?\b", line, flags=re.I):
                assert any(word in line.lower() for word in allowed), f"{path.relative_to(REPO)}:{n}: {line}"


def prose(text: str) -> str:
    """``text`` without fenced blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_relative_links_lead_to_files():
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for path in [README, *DOCS.glob("*.md"), *research_pages()]:
        for target in link.findall(prose(path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = path.parent / file if file else path
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, broken


# ---------------------------------------------------------------------------- the README's examples


def test_readme_python_example_runs_on_the_tiny_preset(tiny, monkeypatch, tmp_path):
    """The example as a user runs it, with the default model swapped for the ``tiny`` preset
    and answers cut to a few tokens."""
    real_generate = tiny.generate

    calls = []

    def short_generate(prompt=None, **kwargs):
        calls.append((prompt, kwargs))
        kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens", 4), 4)
        return real_generate(prompt, **kwargs)

    monkeypatch.setattr(tiny, "generate", short_generate)
    monkeypatch.setattr(mmllm, "load", lambda name=None, **kw: tiny if name in (None, "tiny") else pytest.fail(name))
    monkeypatch.setattr(mmllm, "generate", lambda prompt=None, **kw: short_generate(prompt, **kw))
    monkeypatch.chdir(REPO)
    blocks = fenced(README.read_text(), "python")
    assert blocks, "the README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block.replace("drawing-", str(tmp_path / "drawing-")), str(README), "exec"), {})
    assert out.getvalue(), "the example printed nothing"
    assert any(kw.get("image") == "examples/red_circle.png" for _, kw in calls)
    assert any(kw.get("output_modalities") == ["image"] for _, kw in calls)


def _help_for(argv: list[str], load_script) -> str:
    """``--help`` of the entry point a README command runs."""
    if argv[0].endswith("/mmllm"):
        from mmllm.cli import main
        args = [a for a in argv[1:2] if not a.startswith("-")]
    elif argv[1:3] == ["-m", "demo"]:
        from demo.serve import main
        args = []
    elif argv[1].startswith("scripts/"):
        main = load_script(Path(argv[1]).stem).main
        args = []
    else:
        raise AssertionError(f"no entry point known for {argv}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code in (0, None)
    return out.getvalue()


def readme_commands() -> list[list[str]]:
    commands = []
    for block in fenced(README.read_text(), "bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split("&&"):
                argv = shlex.split(part)
                if argv and (argv[0].endswith("/mmllm") or argv[0].endswith("/python")):
                    if argv[1:3] != ["-m", "pytest"]:
                        commands.append(argv)
    return commands


def test_readme_commands_take_the_flags_they_show(load_script):
    commands = readme_commands()
    entry = {c[0].rsplit("/", 1)[-1] + " " + " ".join(c[1:3]) for c in commands}
    assert any("mmllm chat" in e for e in entry) and any("mmllm generate" in e for e in entry)
    assert any("-m demo" in e for e in entry) and any("train_stage1.py" in e for e in entry)
    from mmllm.cli import main

    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        main(["--help"])
    for argv in commands:
        text = _help_for(argv, load_script)
        for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert flag in text, f"{' '.join(argv)}: {flag} is not in its --help"
        for path in (a for a in argv if a.startswith(("examples/", "scripts/"))):
            assert (REPO / path).exists(), path
