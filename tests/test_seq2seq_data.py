import datetime as dt
import re

import pytest
import torch

from rnnkit.data.seq2seq import (DATE_FORMATS, batches, build_vocab, collate, date_pairs, format_date,
                                 make_splits, reversal_pairs)
from rnnkit.errors import UserError


def test_every_documented_date_format():
    assert [format_date(dt.date(2021, 3, 5), i) for i in range(len(DATE_FORMATS))] == [
        "March 5, 2021", "Mar 5, 2021", "March 5th, 2021", "march 5 2021", "5 March 2021", "5 Mar 2021",
        "05-Mar-2021", "5th March 2021", "the 5th of March, 2021", "Friday, 5th of March 2021",
        "Friday 5 March 2021", "Fri, 5 Mar 2021", "MAR 05 2021", "2021.03.05", "2021/03/05", "2021-3-5",
        "20210305"]
    assert [format_date(dt.date(2000, 1, d), 7).split()[0] for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def _parse_back(text: str) -> tuple[dt.date, str | None]:
    """An independent reading of a generated date: strip ordinals and filler, try strptime forms."""
    day = re.match(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)\w*,? ", text)
    s = re.sub(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun)\w*,? ", "", text)
    s = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", s).replace("the ", "").replace(" of ", " ").replace(",", "")
    for f in ("%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y", "%d-%b-%Y", "%Y.%m.%d", "%Y/%m/%d", "%Y-%m-%d",
              "%Y%m%d"):
        try:
            return dt.datetime.strptime(s, f).date(), day and day.group(1)
        except ValueError:
            pass
    raise AssertionError(f"cannot read {text!r}")


def test_date_pairs_are_right_seeded_and_varied():
    pairs = date_pairs(2000, seed=7)
    assert pairs == date_pairs(2000, seed=7) and pairs != date_pairs(2000, seed=8)
    for src, iso in pairs:
        x, weekday = _parse_back(src)
        assert x.isoformat() == iso and dt.date(1900, 1, 1) <= x <= dt.date(2099, 12, 31)
        assert weekday is None or x.strftime("%a") == weekday
    assert len({re.sub(r"\d", "9", s) for s, _ in pairs}) > 30      # many shapes, not one
    assert not any(re.fullmatch(r"\d{1,2}[/.]\d{1,2}[/.]\d{4}", s) for s, _ in pairs)   # no D/M/Y vs M/D/Y


def test_reversal_pairs():
    pairs = reversal_pairs(500, seed=1)
    assert pairs == reversal_pairs(500, seed=1)
    assert all(t == s[::-1] and 5 <= len(s) <= 20 and set(s) <= set("abcdefghij") for s, t in pairs)
    assert {len(s) for s, _ in pairs} == set(range(5, 21))
    with pytest.raises(UserError, match="min_len <= max_len"):
        reversal_pairs(1, min_len=6, max_len=5)


def test_splits_are_disjoint_and_sized():
    train, val, test = make_splits("reverse", [300, 50, 50], seed=2)
    assert (len(train), len(val), len(test)) == (300, 50, 50)
    sources = [s for s, _ in train + val + test]
    assert len(set(sources)) == 400
    assert make_splits("reverse", [300, 50, 50], seed=2)[2] == test
    with pytest.raises(UserError, match="unknown seq2seq task 'sort'; choose one of reverse, dates"):
        make_splits("sort", [1])


def test_collate_shifts_the_target_by_one_step():
    pairs = [("abc", "cba"), ("hello", "olleh")]
    vocab = build_vocab(pairs)
    assert vocab.tokens[:4] == ("<pad>", "<unk>", "<bos>", "<eos>")
    b = collate(pairs, vocab)
    assert b.src_lengths.tolist() == [3, 5] and b.tgt_lengths.tolist() == [4, 6]
    assert b.tgt_in[:, 0].tolist() == [vocab.bos_id] * 2
    assert b.tgt_out[0].tolist() == vocab.encode("cba") + [vocab.eos_id, 0, 0]
    assert torch.equal(b.tgt_in[1, 1:], b.tgt_out[1, :-1])          # teacher forcing: shifted by one
    assert "".join(vocab.decode(b.src[1].tolist())) == "hello"
    got = [x.src.shape[0] for x in batches(pairs * 5, vocab, 4, shuffle=True)]
    assert got == [4, 4, 2]
