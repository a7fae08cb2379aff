"""The documentation says what the code does."""

from __future__ import annotations

from pathlib import Path

from hxn_liveptycho.devtools.docs_reference import configuration_reference

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_matches_the_models():
    """docs/configuration.md is exactly what the pydantic models generate (defaults in step)."""
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented.strip() == configuration_reference().strip(), (
        "regenerate with: liveptycho config-reference > docs/configuration.md"
    )


def test_readme_opens_with_the_two_commands():
    """The README's first section is install, demo, test."""
    readme = (ROOT / "README.md").read_text()
    first = readme.split("\n## ")[1]
    assert "pip install -e '.[test]'" in first
    assert "liveptycho demo" in first
    assert "\npytest" in first
