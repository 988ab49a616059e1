"""The documentation lives in the repository: every relative link of the README and docs/ resolves
inside it, and nothing points a reader outside the clone."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _markdown():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
