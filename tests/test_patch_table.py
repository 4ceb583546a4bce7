"""Every patch row carries its reason, and the table users read is generated from the rows (issue 19 item 3)."""

from __future__ import annotations

import pytest

import peft_gralora.integration as integration
from peft_gralora.integration import Patch, patch_table, patch_table_markdown
from peft_gralora.integration.patch import owner_name, render_markdown


def test_every_row_is_a_patch_with_a_reason():
    rows = patch_table()
    assert rows
    for row in rows:
        assert isinstance(row, Patch)
        assert callable(row.replacement), row
        assert isinstance(row.why, str) and len(row.why.split()) >= 5, f"{owner_name(row.owner)}.{row.attribute}"


def test_rows_are_unique():
    keys = [(id(row.owner), row.attribute) for row in patch_table()]
    assert len(keys) == len(set(keys))


def test_markdown_lists_every_row_and_its_reason():
    text = patch_table_markdown()
    for row in patch_table():
        assert f"`{owner_name(row.owner)}.{row.attribute}`" in text
        assert row.why.replace("|", "/") in text


def test_rows_sharing_a_reason_share_a_line():
    class A:
        pass

    rows = [Patch(A, "x", lambda o: o, "same reason here"), Patch(A, "y", lambda o: o, "same reason here")]
    lines = render_markdown(rows).splitlines()
    assert len(lines) == 3 and "`.x`" not in lines[2] and ".A.x`, `" in lines[2]


def test_the_module_docstring_points_to_the_generated_table():
    doc = integration.__doc__
    assert "patch_table_markdown" in doc
    assert "``LoraConfig.__init__``   " not in doc  # the hand-written table is gone


@pytest.mark.parametrize("module", ["lora_config", "variant_registry"])
def test_renamed_modules(module):
    import importlib

    assert importlib.import_module(f"peft_gralora.integration.{module}").patches()
