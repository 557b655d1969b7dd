import torch
import pytest

from rnnkit.data.text import (LM_SPECIALS, SEQ2SEQ_SPECIALS, TokenStream, Vocabulary, bundled_text, char_tokens,
                              detokenize, encode_prompt, read_text, split_tail, tokenize, word_tokens)
from rnnkit.errors import UserError


def test_tokenisers():
    assert char_tokens("To be") == ["T", "o", " ", "b", "e"]
    assert word_tokens("To be, or not to be:\nthat's it!") == [
        "To", "be", ",", "or", "not", "to", "be", ":", "\n", "that's", "it", "!"]
    assert word_tokens("'Tis so, o'er it.") == ["'Tis", "so", ",", "o'er", "it", "."]
    assert word_tokens("The END", lower=True) == ["the", "end"]
    with pytest.raises(UserError, match="token level must be one of"):
        tokenize("x", "byte")


def test_detokenize_inverts_word_tokens_up_to_spacing():
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler (in the mind) to suffer!"
    assert detokenize(word_tokens(text), "word") == text
    assert detokenize(tokenize(text, "char"), "char") == text


def test_vocabulary_build_order_and_limits():
    seqs = [list("abracadabra"), list("cab")]                 # a:6 b:3 r:2 c:2 d:1
    v = Vocabulary.build(seqs)
    assert v.tokens == ("<pad>", "<unk>", "a", "b", "c", "r", "d")    # by count, ties in code-point order
    assert (v.pad_id, v.unk_id, len(v)) == (0, 1, 7)
    assert Vocabulary.build(seqs, min_freq=2).tokens == ("<pad>", "<unk>", "a", "b", "c", "r")
    assert Vocabulary.build(seqs, max_size=4).tokens == ("<pad>", "<unk>", "a", "b")
    s2s = Vocabulary.build(seqs, specials=SEQ2SEQ_SPECIALS)
    assert (s2s.bos_id, s2s.eos_id, s2s.tokens[4]) == (2, 3, "a")
    with pytest.raises(UserError, match="no <bos> token"):
        v.bos_id


def test_encode_unknown_maps_to_unk_or_raises():
    v = Vocabulary.build([list("abc")])
    assert v.encode("abz") == [2, 3, 1]
    with pytest.raises(UserError, match=r"1 token\(s\) not in the vocabulary.*'z'"):
        v.encode("abz", unknown="error")
    assert v.decode([0, 2, 1, 4]) == ["a", "c"]
    assert v.decode([0, 2], skip_specials=False) == ["<pad>", "a"]
    with pytest.raises(UserError, match="out of range"):
        v.decode([7])


def test_prompt_policy_char_error_word_unk():
    chars = Vocabulary.build([list("to be or not")])
    assert encode_prompt(chars, "to be", "char") == chars.encode("to be")
    with pytest.raises(UserError, match=r"'Q'"):
        encode_prompt(chars, "Qto", "char")
    words = Vocabulary.build([word_tokens("to be or not to be")])
    assert encode_prompt(words, "to sleep", "word") == [words.encode(["to"])[0], words.unk_id]
    with pytest.raises(UserError, match="prompt is empty"):
        encode_prompt(words, "   ", "word")


def test_vocabulary_json_roundtrip_and_bad_files(tmp_path):
    v = Vocabulary.build([list("héllo\n")], specials=SEQ2SEQ_SPECIALS)
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w == v and w.encode("hé\n") == v.encode("hé\n")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Vocabulary.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"tokens": ["a"]}')
    with pytest.raises(UserError, match="not an rnnkit vocabulary"):
        Vocabulary.load(tmp_path / "other.json")
    with pytest.raises(UserError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    with pytest.raises(UserError, match="duplicate"):
        Vocabulary(LM_SPECIALS + ("a", "a"))


def test_token_stream_rows_windows_and_shift():
    ids = torch.arange(23)                                   # N = 23, B = 3 -> L = 22 // 3 = 7
    s = TokenStream(ids, batch_size=3, bptt=4)
    windows = list(s)
    assert (len(s), len(windows), s.num_tokens) == (2, 2, 21)
    assert [tuple(x.shape) for x, _ in windows] == [(3, 4), (3, 3)]   # the last window is shorter
    x = torch.cat([w[0] for w in windows], 1)                # (3, 7)
    y = torch.cat([w[1] for w in windows], 1)
    assert x.tolist() == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    assert torch.equal(y, x + 1)                              # y is x shifted one token
    assert windows[1][0][:, 0].tolist() == (windows[0][1][:, -1]).tolist()   # rows continue across windows


def test_token_stream_too_short():
    with pytest.raises(UserError, match="too few for 8 parallel streams"):
        TokenStream(list(range(5)), batch_size=8, bptt=4)
    assert list(TokenStream([4, 5], 1, 10))[0][0].tolist() == [[4]]


def test_split_tail():
    head, tail = split_tail(list(range(100)), 0.1)
    assert (head[-1], tail, len(head)) == (89, list(range(90, 100)), 90)
    with pytest.raises(UserError, match=r"in \(0, 1\)"):
        split_tail([1, 2, 3], 1.0)


def test_read_text_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_text(tmp_path / "none.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8.*iconv"):
        read_text(tmp_path / "latin.txt")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="0 non-blank characters"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "ok.txt").write_text("to be\n")
    assert read_text(tmp_path / "ok.txt") == "to be\n"


def test_bundled_text():
    text = bundled_text()
    assert len(text) == 111473 and len(set(text)) == 65
    assert text.startswith("Hamlet\n\nACT I\n") and "BERNARDO:\nWho's there?\n" in text
    assert "\nMacbeth\n\nACT I\n" in text and "*" not in text and "_" not in text
