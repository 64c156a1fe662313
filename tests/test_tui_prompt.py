"""Fitting a conversation into the context: the oldest turns go first, the system prompt stays."""

from runner.backend import Message
from runner.tui.prompt import fit_to_context


def words(turns):
    """A tokenizer stand-in that counts words: enough to test which turns are kept."""
    return [0 for t in turns for _ in t.content.split()]


def test_oldest_turns_are_left_out_and_system_prompt_kept():
    turns = [
        Message("system", "be brief"),
        Message("user", "one two three four"),
        Message("assistant", "five six seven eight"),
        Message("user", "nine ten"),
    ]
    kept, dropped = fit_to_context(turns, words, context=12, max_tokens=4)   # budget 8 words
    assert kept == [turns[0], turns[3]] and dropped == 2


def test_everything_kept_when_it_fits():
    turns = [Message("user", "a b"), Message("assistant", "c"), Message("user", "d")]
    assert fit_to_context(turns, words, context=100, max_tokens=10) == (turns, 0)


def test_a_newest_message_too_long_is_passed_on_for_the_backend_to_refuse():
    turns = [Message("user", "x " * 50)]
    assert fit_to_context(turns, words, context=10, max_tokens=2) == (turns, 0)
