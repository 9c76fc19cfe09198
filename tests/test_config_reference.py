"""docs/CONFIGURATION.md is the generator's output for the models as they are."""

from __future__ import annotations

from pathlib import Path

from hybridrelay.cli import config_reference

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md"


def test_the_committed_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == config_reference.render(), (
        "docs/CONFIGURATION.md is stale: run "
        "python -m hybridrelay.cli.config_reference --write docs/CONFIGURATION.md"
    )


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "CONFIGURATION.md"
    stale.write_text(config_reference.render().replace("9400", "9401"), encoding="utf-8")
    assert config_reference.main(["--check", str(stale)]) == 1
    assert config_reference.main(["--write", str(stale)]) == 0
    assert config_reference.main(["--check", str(stale)]) == 0


def test_every_flag_and_key_is_documented() -> None:
    text = config_reference.render()
    for key in ("`server.port`", "`namespace.hybrid_connections[].name`", "`ingress[].listen`"):
        assert key in text
    for flag in ("`-L`", "`-R`, `-T`", "`-x`, `--connection-string`", "`--port`", "`--data-dir`"):
        assert flag in text
