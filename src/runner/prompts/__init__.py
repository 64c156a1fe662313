"""Prompt sets shipped with runner, as data (`builtin.json`); read by `runner.parity`."""
