"""README.md's config table is generated from the fields' help texts and must not fall behind them."""

from pathlib import Path

from dama.training.arguments import fields_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_table_matches_the_fields():
    assert fields_markdown() in README.read_text(), "run: python scripts/render_config_table.py"
