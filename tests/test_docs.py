"""The documentation lives in the repository: every relative link of the README and docs/ resolves
inside it, and nothing points a reader outside the clone."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _markdown():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_links_the_design_and_contracts_in_docs():
    links = set(LINK.findall((ROOT / "README.md").read_text()))
    assert {"docs/DESIGN.md", "docs/CONTRACTS.md"} <= links


def test_relative_links_resolve_inside_the_repository():
    for page in _markdown():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.relative_to(ROOT)} links {target}, which is not in the repository"


def test_nothing_refers_to_files_outside_the_clone():
    texts = [*_markdown(), *ROOT.glob("genflow/**/*.py"), *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("scripts/*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in texts if "../shared" in p.read_text()]
    assert not offenders, f"these files send readers outside the repository: {offenders}"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_sampling_guides_python_example_runs(trained_ckpt, tmp_path, monkeypatch):
    """The five lines of docs/guide/sampling.md, run as written against a trained checkpoint."""
    (code,) = _python_blocks(ROOT / "docs" / "guide" / "sampling.md")
    assert len([line for line in code.splitlines() if line.strip()]) <= 6
    monkeypatch.chdir(tmp_path)
    exec(code.replace("runs/main/<date>_<time>/checkpoints/final.ckpt", str(trained_ckpt)), {})
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_readme_is_a_short_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = set(LINK.findall(readme))
    for page in ("docs/guide/training.md", "docs/guide/sampling.md", "docs/guide/evaluation.md", "docs/methods.md",
                 "docs/adding.md", "docs/reliability.md", "docs/benchmarks.md", "docs/published-checkpoints.md",
                 "docs/gpu-check.md"):
        assert page in links, f"the README does not link {page}"


def test_no_tracker_numbers_or_outside_note_citations():
    """Papers are cited by name, section and equation; issue trackers and notes outside the repository are not."""
    # each word is spelled with a character class, so this line does not match itself and the file is scanned too
    pattern = re.compile(r"\biss[u]es? ?#?\d+|resea[r]ch not[e]|resea[r]ch/\w+\.md|not[e] [§]|[§] ?\d", re.I)
    files = [*_markdown(), *(ROOT / "docs").rglob("*.md"), *ROOT.glob("genflow/**/*.py"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("scripts/*"), *ROOT.glob("configs/**/*.yaml"), *ROOT.glob(".github/workflows/*.yml"),
             ROOT / "Makefile", ROOT / "train.py", ROOT / "sample.py"]
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files if p.is_file()
                 for m in [pattern.search(p.read_text(errors="ignore"))] if m]
    assert not offenders, offenders
