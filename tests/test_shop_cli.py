"""examples/shop/shop.py's command line: every usage or configuration mistake is one line
on stderr naming what is wrong and exit 2, never a traceback (in-process: main(argv))."""

from __future__ import annotations

import socket
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "shop"))

# examples/shop is not an installed package: its modules are imported by path.
from shop import EXIT_USAGE, main

GOOD = """name = "shop"
gateway = "http://127.0.0.1:9"
merchant_account = "acct-00000"
merchant_client = 0
hold_expires_in_ms = 60000
[api_keys]
"0" = "gk_x"
[items]
mug = { price = 700, stock = 2 }
"""


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name = ", "not TOML"),
        (GOOD.replace('name = "shop"', 'name = "my shop"'), "name must be"),
        (GOOD.replace('name = "shop"\n', ""), "name must be a str"),
        (GOOD.replace("http://", "ftp://"), "gateway must be an http"),
        (GOOD.replace('"acct-00000"', '""'), "merchant_account must be"),
        (
            GOOD.replace("merchant_client = 0", "merchant_client = 1"),
            "no key for merchant_client 1",
        ),
        (GOOD.replace("merchant_client = 0", "merchant_client = true"), "merchant_client must"),
        (GOOD.replace("60000", "0"), "hold_expires_in_ms must be in"),
        (GOOD.replace('"0" = "gk_x"', '"zero" = "gk_x"'), "api_keys maps client ids"),
        (GOOD.replace("price = 700", "price = 7.5"), "items.mug: price must be"),
        (GOOD.replace("stock = 2", "stock = -2"), "items.mug: stock must be"),
        (GOOD.replace("mug = {", '"m g" = {'), "sku must be"),
        (GOOD.replace("mug = { price = 700, stock = 2 }", 'mug = "cheap"'), "items.mug must be"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: str
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(text)
    code, lines = run_main(capsys, "--config", str(config), "--db", str(tmp_path / "s.db"))
    assert (code, len(lines)) == (EXIT_USAGE, 1), lines
    assert lines[0].startswith("shop.py: ") and words in lines[0], lines
    assert not (tmp_path / "s.db").exists()


def test_bad_paths_and_addresses_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(GOOD)
    cases = [
        (["--config", str(tmp_path / "none.toml"), "--db", "s.db"], "No such file"),
        (["--config", str(config), "--db", str(tmp_path / "no" / "s.db")], "--db: no directory"),
        (["--config", str(config), "--db", str(tmp_path)], f"--db {tmp_path}:"),
        (["--config", str(config), "--db", "s.db", "--listen", "0.0.0.0:80"], "--listen must"),
        (["--config", str(config), "--db", "s.db", "--listen", "127.0.0.1:x"], "--listen must"),
    ]
    for argv, words in cases:
        code, lines = run_main(capsys, *argv)
        assert (code, len(lines)) == (EXIT_USAGE, 1), (argv, lines)
        assert words in lines[0], lines


def test_a_taken_port_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(GOOD)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(
            [
                "--config",
                str(config),
                "--db",
                str(tmp_path / "s.db"),
                "--listen",
                f"127.0.0.1:{port}",
            ]
        )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shop.py")]
    assert code == EXIT_USAGE
    assert lines == [f"shop.py: --listen 127.0.0.1:{port}: the address is in use"]


def test_a_database_from_an_older_shop_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "shop.toml"
    config.write_text(GOOD)
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE orders (order_id TEXT PRIMARY KEY, stage TEXT)")
    old.commit()
    old.close()
    code, lines = run_main(capsys, "--config", str(config), "--db", str(tmp_path / "old.db"))
    assert (code, len(lines)) == (EXIT_USAGE, 1), lines
    assert "made by an older shop.py" in lines[0], lines
