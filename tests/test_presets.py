"""The seeded presets a test or the demo builds without a hub: here, the CLIP tokenizer files and token ids the text
encoder presets are paired with (the models' own laws are in test_laws.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from pasd_verify.presets import TEXT_LENGTH, build_text_encoder, text_tokens, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_the_tokenizer_files_load_as_sd15s_and_split_pasds_prompts_into_words(tokenizer):
    """transformers' own CLIPTokenizer reads the files; PASD's added prompt comes out as its words (the merges were
    learnt from it), framed by the start and end tokens and padded with the end token to 77, as SD1.5's is."""
    ids = tokenizer("clean, high-resolution, 8k", padding="max_length", max_length=TEXT_LENGTH,
                    truncation=True).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == TEXT_LENGTH
    assert tokens[:9] == ["<|startoftext|>", "clean</w>", ",</w>", "high</w>", "-</w>", "resolution</w>", ",</w>",
                          "8</w>", "k</w>"]
    assert set(tokens[9:]) == {"<|endoftext|>"}
    # a word it never saw still tokenizes, letter by letter: the byte-level alphabet covers any text
    assert tokenizer.convert_ids_to_tokens(tokenizer("zqx ü").input_ids)[1:-1] == ["z", "q", "x</w>", "Ã", "¼</w>"]


def test_the_files_are_the_same_every_time_they_are_written(tmp_path):
    first, second = write_tokenizer(tmp_path / "a"), write_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


@pytest.mark.parametrize("preset", ["tiny", "sd15"])
def test_the_text_encoders_special_tokens_are_the_tokenizers(tokenizer, preset):
    with torch.device("meta"):  # the config is what is checked: no SD1.5-size weights are made
        config = build_text_encoder(preset).config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(tokenizer) <= config.vocab_size


@given(batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_seeded_tokens_are_laid_out_as_the_tokenizer_lays_out_a_prompt(tokenizer, batch, seed):
    """int32 (the phone's input type), 77 long, the start token, ordinary tokens, then only end tokens."""
    model = build_text_encoder("tiny")
    ids = text_tokens(model, batch=batch, seed=seed)
    assert ids.dtype == torch.int32 and ids.shape == (batch, TEXT_LENGTH)
    for row in ids.tolist():
        assert row[0] == tokenizer.bos_token_id
        end = row.index(tokenizer.eos_token_id)
        assert end >= 2 and set(row[end:]) == {tokenizer.eos_token_id}
        assert all(0 <= t < tokenizer.bos_token_id for t in row[1:end])
    assert json.dumps(ids.tolist()) == json.dumps(text_tokens(model, batch=batch, seed=seed).tolist())


def test_a_clip_config_whose_special_ids_lie_outside_its_vocabulary_gets_samples_inside_it_and_a_warning(caplog):
    """transformers' CLIP defaults (bos 49406, eos 49407) are SD1.5's: a small config saved without setting them
    names ids its embedding does not have. The export's seeded samples must stay inside the vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from pasd_verify.quant.calibration import seeded_samples

    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=TEXT_LENGTH, projection_dim=32)
    assert config.bos_token_id >= config.vocab_size  # the case at hand
    model = CLIPTextModel(config).eval()
    with caplog.at_level("WARNING", logger="pasd_verify"):
        samples = seeded_samples(model, 2)
    for sample in samples:
        ids = sample["input_ids"]
        assert 0 <= int(ids.min()) and int(ids.max()) < config.vocab_size
        assert int(ids[0, 0]) == config.vocab_size - 2 and int(ids[0, -1]) == config.vocab_size - 1
        with torch.no_grad():
            assert torch.isfinite(model(ids.long()).last_hidden_state).all()
    assert "bos_token_id 49406" in caplog.text and "eos_token_id 49407" in caplog.text
    assert "config.json" in caplog.text
