"""The docs keep up with the code: every command and option has help text and a mention on its page,
every page is linked from the README, the schema tables equal the schema module, the README stays
short, links resolve, and the library examples in the docs run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.main
from _images import write_images

from uwe_cli.cli import app
from uwe_cli.schema import DETECTION_COLUMNS, UNIT_COLUMNS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250

# Every command (its path below `uwe`) and the page documenting it. A new command adds one line here.
COMMAND_PAGES = {
    "extract classification": "extract-classification.md",
    "extract segmentation": "extract-segmentation.md",
    "extract detection": "extract-detection.md",
    "select": "select.md",
    "inspect": "inspect.md",
    "export": "export.md",
    "report": "report.md",
    "simulate": "simulate.md",
}

# Pages whose ```python blocks run, in order, in one namespace, in a folder set up by `example_folder`.
EXAMPLE_PAGES = ("api.md", "schema.md")


def command_tree() -> dict[str, Any]:
    """Every command and group of the CLI by its path ("" is `uwe` itself), from the click tree."""
    found: dict[str, Any] = {}

    def walk(command: Any, path: str) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


def leaf_commands() -> dict[str, Any]:
    return {path: c for path, c in command_tree().items() if not hasattr(c, "commands")}


def long_options(command: Any) -> list[str]:
    names = []
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            names += [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
    return names


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_has_a_docs_page() -> None:
    assert sorted(leaf_commands()) == sorted(COMMAND_PAGES), "add the new command to COMMAND_PAGES"
    for path, page in COMMAND_PAGES.items():
        assert (DOCS / page).is_file(), f"uwe {path}: docs/{page} is missing"


def test_every_command_and_option_has_help_text() -> None:
    for path, command in command_tree().items():
        assert (command.help or "").strip(), f"`uwe {path}` has no help text"
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(), (
                f"`uwe {path}`: {param.name} has no help text"
            )


@pytest.mark.parametrize("path", sorted(COMMAND_PAGES))
def test_every_option_is_on_its_commands_page(path: str) -> None:
    text = (DOCS / COMMAND_PAGES[path]).read_text(encoding="utf-8")
    missing = [o for o in long_options(leaf_commands()[path]) if not mentions(text, o)]
    assert not missing, f"docs/{COMMAND_PAGES[path]} does not mention {', '.join(missing)}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {', '.join(unlinked)}"


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_schema_tables_equal_the_schema_module() -> None:
    text = (DOCS / "schema.md").read_text(encoding="utf-8")
    for name, columns in (("UNIT_COLUMNS", UNIT_COLUMNS), ("DETECTION_COLUMNS", DETECTION_COLUMNS)):
        assert markdown_table(columns) in text, f"docs/schema.md: paste markdown_table({name}) again"


def repo_text_files() -> list[Path]:
    """Tracked and new (not ignored) files of the repository that are text."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [ROOT / p for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it
        skip = {".venv", ".git", "demo-out", "bench-out", "__pycache__"}
        paths = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    files = []
    for path in paths:
        try:
            path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        files.append(path)
    return files


def test_nothing_points_outside_the_repository() -> None:
    # The design notes live outside the repository; nothing in it may send readers there.
    needle = "design" + ".md"
    offenders = [
        str(p.relative_to(ROOT)) for p in repo_text_files() if needle in p.read_text(encoding="utf-8").lower()
    ]
    assert not offenders, f"{needle} is mentioned in {', '.join(offenders)}"


def test_docs_pages_named_anywhere_exist() -> None:
    for path in repo_text_files():
        for name in re.findall(r"docs/([\w.-]+\.md)", path.read_text(encoding="utf-8")):
            assert (DOCS / name).is_file(), (
                f"{path.relative_to(ROOT)} names docs/{name}, which does not exist"
            )


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_between_pages_resolve() -> None:
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.name}: link to {target} points nowhere"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


@pytest.fixture
def example_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the library examples expect: an image folder `digits/` and `tiny.pth` (a tiny_net state_dict)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    from tiny_net import tiny_cnn

    write_images(tmp_path / "digits", n=30, size=12)
    torch.manual_seed(0)
    torch.save(tiny_cnn(10).state_dict(), tmp_path / "tiny.pth")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_library_examples_in_the_docs_run(page: str, example_folder: Path) -> None:
    from uwe_cli.extract.detection.base import FAMILIES
    from uwe_cli.selection.strategies import STRATEGIES
    from uwe_cli.selection.tracker import TRACKERS

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"docs/{page} has no python examples"
    saved = [(registry, dict(registry)) for registry in (FAMILIES, STRATEGIES, TRACKERS)]
    namespace: dict[str, Any] = {"__name__": f"docs_{page}"}
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"docs/{page}, python example {number}", "exec"), namespace)
    finally:
        for registry, before in saved:  # examples register strategies, families, backends
            registry.clear()
            registry.update(before)
