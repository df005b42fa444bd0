"""Settings: defaults < YAML < environment < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkcache.config import Settings
from chunkcache.errors import InvalidInputError


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: from-yaml\nrecompute_ratio: 0.3\nmax_new_tokens: 9\n")
    env = {"CHUNKCACHE_CONFIG": str(config), "CHUNKCACHE_RECOMPUTE_RATIO": "0.5", "CHUNKCACHE_STORE_PATH": "~/s"}
    s = Settings.load(env=env, max_new_tokens=None, epic_k=4)
    assert (s.model, s.recompute_ratio, s.max_new_tokens, s.epic_k) == ("from-yaml", 0.5, 9, 4)
    assert s.store_path == Path("~/s").expanduser()


@pytest.mark.parametrize(
    ("text", "message"), [("nope: 1\n", "unknown setting"), ("epic_k: many\n", "epic_k must be a int"), ("- a\n", "mapping")]
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        Settings.load(config, env={})


def test_commands_load_settings_one_way_flags_over_yaml_and_none_drops_a_flag(tmp_path: Path,
                                                                             monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import argparse

    config = tmp_path / "c.yaml"
    config.write_text("model: qwen2.5-0.5b\nstore_path: /from/yaml\nmax_new_tokens: 7\n")
    monkeypatch.delenv("CHUNKCACHE_CONFIG", raising=False)
    args = argparse.Namespace(config=str(config), model="smollm2-135m", dtype=None, store="/from/flag")
    settings = Settings.from_args(args, max_new_tokens=9)
    assert (settings.model, settings.store_path, settings.max_new_tokens) == ("smollm2-135m", Path("/from/flag"), 9)
    checked = Settings.from_args(args, model=None)  # check-model: its argument is not the served model
    assert checked.model == "qwen2.5-0.5b"
    bare = Settings.from_args(argparse.Namespace(config=str(config)))  # a command without the shared flags
    assert bare.store_path == Path("/from/yaml")
