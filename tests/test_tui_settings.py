"""The chat settings as typed in the form, and as saved in the history."""

from __future__ import annotations

import pytest

from runner.errors import UserInputError
from runner.tui.screens.settings import ChatSettings, parse_settings, settings_from_dict


@pytest.mark.parametrize("temperature, top_p, field", [
    ("nan", "1", "temperature"), ("inf", "1", "temperature"), ("-inf", "1", "temperature"),
    ("0.5", "nan", "top-p"), ("0.5", "inf", "top-p"),
])
def test_not_a_number_and_infinity_are_refused_naming_the_field(temperature, top_p, field):
    with pytest.raises(UserInputError, match=f"^{field} must be a finite number"):
        parse_settings("", temperature, top_p, "64")


def test_saved_settings_with_nan_fall_back_to_the_defaults():
    assert settings_from_dict({"temperature": float("nan"), "top_p": 0.9}) == ChatSettings()
    assert parse_settings(" be brief ", "0.7", "0.9", "64") == ChatSettings("be brief", 0.7, 0.9, 64)
