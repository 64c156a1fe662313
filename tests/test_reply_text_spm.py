"""A reply's text with a SentencePiece-style tokenizer (a Metaspace "▁" pre-tokenizer and decoder,
as Llama 2 and Mistral have): the first reply word keeps its leading space, as the decode of the
prompt and reply together has it. Decoded alone, "▁Paris" is "Paris" (the decoder strips the space
of the first word it decodes), so a session must decode the reply after the prompt's last ids.

The model is a tiny Llama whose weights spell out one reply: its attention and MLP outputs are
zero, so the last position's hidden state is its own token's embedding (one-hot), and the lm_head
maps each token of the script to the next one. Greedy decoding then follows the script to the end
token, on every backend that runs safetensors.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY_LLAMA

PROMPT = "The capital of France is"
REPLY = " Paris, not Rome."
CORPUS = ["The capital of France is Paris, not Rome.", "The capital of Italy is Rome.", "Paris is in France."] * 20
VOCAB = 64      # at most the hidden size: each token's embedding is a one-hot vector


def spm_tokenizer():
    """A BPE tokenizer trained here with Metaspace pre-tokenizer and decoder (tokenizers'
    SentencePieceBPETokenizer), wrapped as transformers' fast tokenizer."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(CORPUS, vocab_size=VOCAB, min_frequency=1, show_progress=False,
                            special_tokens=["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def decoded_after(tokenizer, prompt: list[int], reply: list[int]) -> str:
    """What the reply adds to the decoded prompt."""
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return decode(prompt + reply)[len(decode(prompt)):]


@pytest.fixture(scope="module")
def spm_llama_dir(tmp_path_factory):
    """The scripted tiny Llama (float32 safetensors) with the SPM-style tokenizer; the script goes
    from the prompt's last token through REPLY's tokens to the end token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = spm_tokenizer()
    prompt = tokenizer.encode(PROMPT)
    reply = tokenizer.encode(PROMPT + REPLY)[len(prompt):]
    script = [prompt[-1], *reply, tokenizer.eos_token_id]
    assert len(set(script[:-1])) == len(script) - 1     # each step's next token is its own
    folder = tmp_path_factory.mktemp("spm-llama")
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": VOCAB, "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id},
                         dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB, config.hidden_size))
        model.lm_head.weight.zero_()
        for token, following in zip(script, script[1:]):
            model.lm_head.weight[following, token] = 10.0
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation) + "\n")
    return folder


def test_the_tokenizer_strips_the_space_of_a_reply_decoded_alone():
    tokenizer = spm_tokenizer()
    prompt = tokenizer.encode(PROMPT)
    reply = tokenizer.encode(PROMPT + REPLY)[len(prompt):]
    assert tokenizer.convert_ids_to_tokens(reply)[0].startswith("\u2581")
    assert tokenizer.decode(reply) == REPLY.lstrip()
    assert decoded_after(tokenizer, prompt, reply) == REPLY


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_a_sessions_reply_keeps_its_first_space(spm_llama_dir, backend):
    """The reply streamed by a session is the decode after the prompt (cuda gave "Paris, ...")."""
    from runner.backend import LoadRequest, Sampling, get_backend
    from runner.model import load_spec

    pytest.importorskip({"cuda": "transformers", "mlx": "mlx_lm"}[backend])
    session = get_backend(backend).load(LoadRequest(load_spec(str(spm_llama_dir)), "fp32", 256))
    try:
        prompt = session.encode(PROMPT)
        chunks = list(session.stream_tokens(prompt, Sampling(max_tokens=16)))
    finally:
        session.close()
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == REPLY
