from collections import Counter

import pytest
import torch

from rnnkit.data.classify import (CsvColumns, LabelledTexts, PaddedBatches, bundled_reviews, check_labelled,
                                  pad_batch, read_labelled_csv, stratified_split)
from rnnkit.errors import UserError


def _csv(tmp_path, text):
    p = tmp_path / "data.csv"
    p.write_text(text)
    return p


def test_read_csv_with_named_columns(tmp_path):
    p = _csv(tmp_path, 'id,review,sentiment\n1,"Good, really.",pos\n2, Bad. ,neg\n3,Fine,pos\n4,Awful,neg\n')
    d = read_labelled_csv(p, CsvColumns("review", "sentiment"))
    assert d.texts == ("Good, really.", "Bad.", "Fine", "Awful")
    assert d.labels == ("pos", "neg", "pos", "neg") and d.classes == ("neg", "pos")
    assert d.counts() == {"neg": 2, "pos": 2}


def test_missing_column_names_the_columns_and_the_flag(tmp_path):
    p = _csv(tmp_path, "review,label\nx,a\n")
    with pytest.raises(UserError, match=r"no column 'text'; its columns are \['review', 'label'\].*--text-column"):
        read_labelled_csv(p)


def test_empty_rows_are_refused_or_dropped(tmp_path):
    p = _csv(tmp_path, "text,label\ngood,pos\n  ,neg\nbad,\nok,pos\nmeh,neg\nnice,neg\n")
    with pytest.raises(UserError, match=r"2 row\(s\) have an empty text or label \(lines \[3, 4\]\)"):
        read_labelled_csv(p)
    d = read_labelled_csv(p, CsvColumns(drop_empty=True))
    assert d.texts == ("good", "ok", "meh", "nice")


def test_one_class_or_tiny_class_is_refused(tmp_path):
    with pytest.raises(UserError, match="one class only \\('pos', 3 rows\\)"):
        read_labelled_csv(_csv(tmp_path, "text,label\na,pos\nb,pos\nc,pos\n"))
    with pytest.raises(UserError, match=r"fewer than 2 examples.*\{'neg': 1\}"):
        check_labelled(LabelledTexts(("a", "b", "c"), ("pos", "pos", "neg")))
    with pytest.raises(UserError, match="has a header but no data rows"):
        read_labelled_csv(_csv(tmp_path, "text,label\n"))
    with pytest.raises(UserError, match="not found"):
        read_labelled_csv(tmp_path / "nope.csv")


def test_bundled_reviews():
    d = bundled_reviews()
    assert d.counts() == {"fresh": 867, "rotten": 633}
    assert all(t.strip() == t and t for t in d.texts)


def test_stratified_split_keeps_proportions():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    train, test = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + test) == list(range(100)) and not set(train) & set(test)
    assert Counter(labels[i] for i in test) == {"a": 12, "b": 6, "c": 2}
    assert stratified_split(labels, 0.2, seed=3) == (train, test)
    assert stratified_split(labels, 0.2, seed=4)[1] != test
    small = ["x", "x", "y", "y"]
    assert sorted(small[i] for i in stratified_split(small, 0.1)[1]) == ["x", "y"]    # at least one each
    with pytest.raises(UserError, match="single example"):
        stratified_split(["x", "x", "y"], 0.5)


def test_pad_batch():
    tokens, lengths = pad_batch([[5, 6, 7], [8], [9, 9]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]] and lengths.tolist() == [3, 1, 2]
    tokens, lengths = pad_batch([[5, 6, 7], [8]], pad_id=1, max_len=2)
    assert tokens.tolist() == [[5, 6], [8, 1]] and lengths.tolist() == [2, 1]
    with pytest.raises(UserError, match=r"sequence\(s\) \[1\] of the batch have no tokens"):
        pad_batch([[1], []], pad_id=0)


def test_padded_batches_cover_each_example_once_and_replay():
    seqs = [[1] * (i % 7 + 1) for i in range(23)]
    batches = PaddedBatches(seqs, list(range(23)), batch_size=5, pad_id=0, shuffle=True, seed=1, bucket=True)
    first = list(batches.epoch(0))
    assert len(batches) == len(first) == 5
    assert sorted(torch.cat([b[2] for b in first]).tolist()) == list(range(23))
    for tokens, lengths, labels in first:
        assert lengths.tolist() == [len(seqs[i]) for i in labels.tolist()]
        assert tokens.shape[1] == lengths.max()
    again = list(batches.epoch(0))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(first, again))
    assert [b[2].tolist() for b in iter(batches)] == [b[2].tolist() for b in first]   # pass 0, then 1
    assert [b[2].tolist() for b in iter(batches)] != [b[2].tolist() for b in first]
