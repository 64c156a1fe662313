"""The MLX backend's reply text is the tokenizer's decode of the reply's ids: mlx-lm's streaming
detokenizer dropped the first token's leading space (" Paris" came out as "Paris")."""

from __future__ import annotations

import pytest

from mlx_helpers import load

pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def default_q8(default_model_dir):
    session = load(default_model_dir, "q8")
    yield session
    session.close()


def decoded_after(tokenizer, prompt: list[int], reply: list[int]) -> str:
    """What the reply adds to the decoded prompt."""
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return decode(prompt + reply)[len(decode(prompt)):]


@pytest.mark.slow
def test_plain_completion_keeps_its_leading_space(default_q8):
    from runner.backend import Sampling

    prompt = default_q8.encode("The capital of France is")
    chunks = list(default_q8.stream_tokens(prompt, Sampling(max_tokens=8)))
    reply = [c.token for c in chunks if c.token is not None]
    text = "".join(c.text for c in chunks)
    assert text.startswith(" Paris"), text
    assert text == default_q8._tokenizer.decode(reply)
    assert text == decoded_after(default_q8._tokenizer, prompt, reply)


@pytest.mark.slow
def test_chat_reply_is_the_decode_of_its_tokens(default_q8):
    from runner.backend import Message, Sampling

    messages = [Message("user", "What is the capital of France?")]
    chunks = list(default_q8.stream(messages, Sampling(max_tokens=12)))
    reply = [c.token for c in chunks if c.token is not None]
    text = "".join(c.text for c in chunks)
    assert "Paris" in text
    assert text == decoded_after(default_q8._tokenizer, default_q8.tokenize(messages), reply)


def test_multibyte_characters_are_held_back_until_complete(default_model_dir):
    """SmolLM2's byte-level BPE splits "🦩" over three tokens: no piece carries half of it."""
    from transformers import AutoTokenizer

    from runner.detokenize import ReplyText

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    prompt = tokenizer.encode("Say hi")
    reply = tokenizer.encode(" héllo 🦩 wörld")
    decoder = ReplyText(tokenizer, prompt)
    pieces = [decoder.add(token) for token in reply] + [decoder.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]            # the emoji's first bytes came out as nothing
    assert "".join(pieces) == " héllo 🦩 wörld" == decoded_after(tokenizer, prompt, reply)


def test_an_unfinished_character_flushes_as_a_replacement(default_model_dir):
    from transformers import AutoTokenizer

    from runner.detokenize import ReplyText

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    emoji = tokenizer.encode(" 🦩")
    assert len(emoji) > 1
    decoder = ReplyText(tokenizer, tokenizer.encode("Say"))
    assert [decoder.add(token) for token in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert decoder.flush() == tokenizer.decode(emoji[:-1]) and "\ufffd" in tokenizer.decode(emoji[:-1])


def test_sentencepiece_style_first_word_keeps_its_space():
    """An SPM-style decoder strips the space of the first word it decodes: decoded alone,
    "▁Paris" is "Paris"; after the prompt it is " Paris", as the whole text has it."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from runner.detokenize import ReplyText

    corpus = ["The capital of France is Paris.", "The capital of Italy is Rome."] * 20
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(corpus, vocab_size=80, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm)
    prompt = tokenizer.encode("The capital of France is")
    reply = tokenizer.encode("The capital of France is Paris.")[len(prompt):]
    assert tokenizer.decode(reply) == "Paris."        # the space a reply decoded alone loses
    decoder = ReplyText(tokenizer, prompt)
    text = "".join(decoder.add(token) for token in reply) + decoder.flush()
    assert text == " Paris." == decoded_after(tokenizer, prompt, reply)
