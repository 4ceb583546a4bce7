"""docs/troubleshooting.md lists every error and warning the package raises, and nothing it no longer raises.

The scan and the page format are in tests/docs_errors.py. When this fails, run ``python -m tests.docs_errors``: it
prints the missing rows ready to paste (fill in cause and fix) and the stale ones with their line numbers.
"""

from __future__ import annotations

from .docs_errors import PAGE, differences, key_of, page_entries, row, source_messages, template


def test_every_raised_message_is_on_the_troubleshooting_page():
    missing, _ = differences()
    assert not missing, (
        f"{len(missing)} error/warning messages raised in src/ are not on {PAGE.name}; add these rows (fill in cause "
        "and fix), or run `python -m tests.docs_errors`:\n" + "\n".join(row(m) for m in missing)
    )


def test_every_page_row_is_still_raised():
    _, stale = differences()
    assert not stale, (
        f"rows of {PAGE.name} whose message the code no longer has (remove or update them):\n"
        + "\n".join(f"line {line}: `{kind}` `{key}`" for kind, key, line in stale)
    )


def test_the_scan_sees_the_kinds_of_messages_it_must():
    # a scan that found nothing would let the two tests above pass trivially
    kinds = {kind for kind, _ in source_messages()}
    assert {"ValueError", "AdapterConversionError", "RuntimeError", "UnsupportedPeftVersionError"} <= kinds
    assert "UserWarning" in kinds and "logger.warning" in kinds
    assert len(page_entries()) >= 100


def test_templates_and_keys():
    import ast

    node = ast.parse('f"gralora_k must be {k!r} and {x}{y}, " f"not {{this}}"').body[0].value
    assert template(node) == "gralora_k must be … and ……, not {this}"
    assert key_of(template(node)) == "gralora_k must be … and …, not {this}"
    assert key_of("adapter %r was saved with %d modules") == "adapter … was saved with … modules"
    long = "word " * 30
    assert len(key_of(long)) <= 60 and key_of(long).endswith("word")
