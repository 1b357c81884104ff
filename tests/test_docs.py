"""The README's config reference is what the config classes generate: it cannot drift from the code."""

from __future__ import annotations

import dataclasses

from opsd.configlib import describe
from orchestrator.config import OPSDConfig
from orchestrator.reference import README, config_reference, readme_block


def test_readme_config_reference_is_current():
    text = README.read_text(encoding="utf-8")
    start, end = readme_block(text)
    assert text[start:end].strip() == config_reference().strip(), (
        "README.md's config reference is stale: run `opsd config reference --write`")


def test_reference_lists_every_key_with_its_doc():
    reference = config_reference()
    docs = describe(OPSDConfig)
    assert all(d.doc for d in docs), [d.key for d in docs if not d.doc]
    for d in docs:
        assert f"| `{d.key}` |" in reference
    for section in dataclasses.fields(OPSDConfig):
        assert f"#### `{section.name}`:" in reference


def test_write_updates_only_the_block(tmp_path):
    from orchestrator.reference import BEGIN, END, write_readme_reference

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{BEGIN}\nold text\n{END}\n\nafter\n")
    assert write_readme_reference(readme) is True
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old text" not in text and "| `learner.lora.rank` |" in text
    assert write_readme_reference(readme) is False  # already current
