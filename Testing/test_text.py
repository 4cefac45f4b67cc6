"""Report text into words and sentences, and the text encoder's word/sentence/report features."""

from __future__ import annotations

import random

import torch

from afloc_engine.text import augment_report, split_sentences


def test_split_sentences_keeps_one_word_prompts_and_splits_numbered_items():
    assert split_sentences("Pneumothorax") == [["pneumothorax"]]
    assert split_sentences("1. No pneumothorax. 2. Small left effusion.\nHeart normal") == [
        ["no", "pneumothorax"],
        ["small", "left", "effusion"],
        ["heart", "normal"],
    ]
    assert split_sentences("Opacité basale droite") == [["opacite", "basale", "droite"]]  # accents folded (88f24fb)
    # converted reference models: non-ASCII characters dropped, as the reference's process_text does
    assert split_sentences("Opacité basale ∞ droite", fold_accents=False) == [["opacit", "basale", "droite"]]
    assert split_sentences("  ... ") == []


def test_augment_report_subsamples_and_shuffles_but_never_empties():
    sentences = [[f"w{i}"] for i in range(10)]
    rng = random.Random(0)
    out = augment_report(sentences, rng, keep_fraction=0.5)
    assert len(out) == 5 and all(s in sentences for s in out)
    assert augment_report([["one"]], rng, keep_fraction=0.1) == [["one"]]


def test_word_index_maps_subword_pieces_to_words_and_sentences(tiny_model):
    enc = tiny_model.text_encoder
    tokens = enc.tokenize(["No pneumothorax. Bilateral opacities"])
    words = [["no", "pneumothorax"], ["bilateral", "opacities"]]
    ids = tokens.input_ids[0].tolist()
    for w_index, word in enumerate(w for s in words for w in s):
        pieces = [ids[i] for i in range(len(ids)) if tokens.word_index[0, i] == w_index]
        assert enc.tokenizer.decode(pieces).replace(" ", "") == word
    assert tokens.n_words.tolist() == [4] and tokens.n_sentences.tolist() == [2]
    assert set(tokens.sentence_index[0].tolist()) == {-1, 0, 1}


def test_word_features_sum_pieces_and_padding_never_leaks(tiny_model):
    enc = tiny_model.text_encoder
    with torch.no_grad():
        alone = enc.encode(["Small left pleural effusion"])
        batched = enc.encode(
            ["Small left pleural effusion", "A much longer report. With two sentences about the heart."]
        )
        # the first report's features do not change when padded next to a longer one
        n = int(alone.word_mask.sum())
        torch.testing.assert_close(batched.words[0, :n], alone.words[0, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.report[0], alone.report[0], atol=1e-4, rtol=1e-4)
        assert not batched.word_mask[0, n:].any()
        # a word's feature is the projection of the sum of its pieces' features
        tokens = enc.tokenize(["pneumothorax"])
        hidden = enc.subword_features(tokens)[0]
        pieces = tokens.word_index[0] == 0
        expected = enc.projection(hidden[pieces].sum(0))
        torch.testing.assert_close(enc(tokens).words[0, 0], expected, atol=1e-4, rtol=1e-4)
        # sentence = mean of its tokens; one-sentence report == its sentence
        one = enc.encode(["Small left pleural effusion"])
        torch.testing.assert_close(one.sentences[0, 0], one.report[0], atol=1e-4, rtol=1e-4)
