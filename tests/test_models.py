import pytest
import torch
import torch.nn.functional as F

from rnnkit.data.classify import pad_batch
from rnnkit.data.seq2seq import build_vocab, collate, reversal_pairs
from rnnkit.data.text import TokenStream, Vocabulary, encode_prompt
from rnnkit.errors import UserError
from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier
from rnnkit.models.language import (
    LanguageModel,
    LanguageModelConfig,
    detach_state,
    next_token_probs,
)
from rnnkit.models.seq2seq import Seq2Seq, Seq2SeqConfig

# -- language model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "mingru", "minlstm"])
def test_lm_shapes_and_stateful_windows_equal_one_pass(cell):
    lm = LanguageModel(LanguageModelConfig(vocab_size=11, embed_dim=8, hidden_size=16, num_layers=2, cell=cell)).eval()
    ids = torch.randint(0, 11, (3 * 10 + 1,))
    stream = TokenStream(ids, batch_size=3, bptt=4)
    whole, _ = lm(stream.x)                                    # (3, 10, 11) in one pass
    assert whole.shape == (3, 10, 11)
    state, parts = None, []
    for x, _ in stream:                                        # windows 4, 4, 2 with the state carried
        logits, state = lm(x, state)
        state = detach_state(state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-6, rtol=0)
    h = state[0] if cell == "lstm" else state
    assert h.shape == (2, 3, 16) and not h.requires_grad


def test_next_token_probs_temperature_top_k_suppress():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    torch.testing.assert_close(next_token_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))
    p = next_token_probs(logits, 2.0, top_k=2)                 # only ids 4 and 0 remain
    e = torch.exp(torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(p, torch.tensor([e[1], 0, 0, 0, e[0]]) / e.sum())
    p = next_token_probs(logits, 1.0, top_k=2, suppress_ids=[4])
    assert p.nonzero().flatten().tolist() == [0, 1]
    assert next_token_probs(logits, 0).tolist() == [0, 0, 0, 0, 1]
    cold, hot = next_token_probs(logits, 0.25), next_token_probs(logits, 4.0)
    entropy = lambda q: -(q * q.clamp_min(1e-30).log()).sum()  # noqa: E731
    assert entropy(cold) < entropy(next_token_probs(logits, 1.0)) < entropy(hot)


def _tiny_lm():
    torch.manual_seed(1)
    return LanguageModel(LanguageModelConfig(vocab_size=12, embed_dim=8, hidden_size=16, num_layers=1))


def test_sampling_respects_top_k_and_suppression_at_every_step():
    lm = _tiny_lm()
    prompt = [3, 4, 5]
    out = lm.sample(prompt, 40, temperature=1.5, top_k=3, suppress_ids=[0, 1],
                    generator=torch.Generator().manual_seed(0))
    assert len(out) == 40 and not {0, 1} & set(out)
    logits, _ = lm.eval()(torch.tensor([prompt + out]))       # replay: each draw was in its step's top 3
    z = logits[0, len(prompt) - 1: -1].clone()
    z[:, [0, 1]] = float("-inf")
    top3 = z.topk(3, -1).indices
    assert all(tok in top3[i].tolist() for i, tok in enumerate(out))
    assert len(set(out)) > 3                                   # and it does sample, not always the argmax


def test_sampling_greedy_limits_and_seed():
    lm = _tiny_lm()
    greedy = lm.sample([3], 20, temperature=0)
    for seed in range(3):                                      # top_k=1 is greedy whatever the seed
        assert lm.sample([3], 20, top_k=1, generator=torch.Generator().manual_seed(seed)) == greedy
    a = lm.sample([3], 20, generator=torch.Generator().manual_seed(5))
    assert a == lm.sample([3], 20, generator=torch.Generator().manual_seed(5))
    for kwargs, msg in [(dict(temperature=-1.0), "temperature must be finite and >= 0"),
                        (dict(temperature=float("inf")), "temperature must be finite"),
                        (dict(temperature=float("nan")), "temperature must be finite"), (dict(top_k=0), "top_k must be"),
                        (dict(suppress_ids=range(12)), "every token is suppressed"),
                        (dict(suppress_ids=[12]), r"suppress_ids must lie in \[0, 12\)")]:
        with pytest.raises(UserError, match=msg):
            lm.sample([3], 5, **kwargs)
    with pytest.raises(UserError, match=r"prompt ids must lie in \[0, 12\)"):
        lm.sample([12], 5)
    with pytest.raises(UserError, match="prompt is empty"):
        lm.sample([], 5)


def test_extreme_temperatures_give_probabilities_not_nan():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for t in (1e-39, 1e-300, 1e308):                           # 1/t overflows float32, or t rounds to 0
        p = next_token_probs(logits, t, top_k=3, suppress_ids=[3])
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6 and p[3] == 0
    assert next_token_probs(logits, 1e-39).argmax() == 1 and next_token_probs(logits, 1e-39)[1] == 1
    assert torch.allclose(next_token_probs(logits, 1e308, suppress_ids=[3]), torch.tensor([1 / 3] * 3 + [0.0]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_sampling_inside_autocast_runs_in_the_weights_dtype(cell):
    torch.manual_seed(0)
    lm = LanguageModel(LanguageModelConfig(vocab_size=12, embed_dim=8, hidden_size=16, num_layers=2, cell=cell))
    plain = lm.sample([3, 4], 20, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lm.sample([3, 4], 20, generator=torch.Generator().manual_seed(1)) == plain


def test_sampling_restores_training_mode_after_an_error():
    lm = _tiny_lm().train()
    with pytest.raises(TypeError):
        lm.sample([3], 5, generator="not a generator")
    assert lm.training


def _sample_by_layer_calls(lm, prompt, n, temperature, generator, seen):
    """What sample did before it streamed: the whole model called on each new token."""
    with torch.no_grad():
        logits, state = lm.eval()(torch.tensor([prompt]))
        out = []
        for _ in range(n):
            seen.append(logits[0, -1].clone())
            probs = next_token_probs(logits[0, -1], temperature)
            nxt = int(probs.argmax()) if temperature == 0 else int(torch.multinomial(probs, 1, generator=generator))
            out.append(nxt)
            logits, state = lm(torch.tensor([[nxt]]), state)
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "mingru", "minlstm"])
def test_sampling_streams_the_same_tokens_as_calling_the_layer(cell, monkeypatch):
    """Same tokens, and each drawn from the same logits (to float32 rounding) as the per-call path."""
    from rnnkit.models import language
    seen = []
    monkeypatch.setattr(language, "next_token_probs", lambda z, *a: seen.append(z.clone()) or next_token_probs(z, *a))
    torch.manual_seed(2)
    lm = LanguageModel(LanguageModelConfig(vocab_size=12, embed_dim=8, hidden_size=16, num_layers=2, cell=cell,
                                           dropout=0.3))
    lm.train()                                                 # sample switches dropout off and back on
    for temperature, seed in [(0, 0), (1.0, 3), (0.7, 4)]:
        del seen[:]
        got = lm.sample([3, 4], 30, temperature, generator=torch.Generator().manual_seed(seed))
        assert lm.training
        streamed, ref_seen = list(seen), []
        ref = _sample_by_layer_calls(lm, [3, 4], 30, temperature, torch.Generator().manual_seed(seed), ref_seen)
        lm.train()
        assert got == ref
        torch.testing.assert_close(torch.stack(streamed), torch.stack(ref_seen), rtol=1e-5, atol=1e-6)
        assert temperature == 0 or len(set(got)) > 3           # draws, not one token over and over


def test_unseen_prompt_characters_are_an_error_for_a_char_model():
    vocab = Vocabulary.build([list("to be or not to be")])
    lm = LanguageModel(LanguageModelConfig(vocab_size=len(vocab), embed_dim=4, hidden_size=8, num_layers=1))
    with pytest.raises(UserError, match=r"not in the vocabulary.*'Z'"):
        lm.sample(encode_prompt(vocab, "Zo be", "char"), 5)
    assert len(lm.sample(encode_prompt(vocab, "to be", "char"), 5, suppress_ids=vocab.special_ids)) == 5


def test_lm_config_is_validated():
    with pytest.raises(UserError, match="cell must be one of rnn, lstm, gru"):
        LanguageModelConfig(vocab_size=5, cell="transformer")
    with pytest.raises(UserError, match="tie_weights needs embed_dim == hidden_size"):
        LanguageModelConfig(vocab_size=5, embed_dim=8, hidden_size=16, tie_weights=True)
    lm = LanguageModel(LanguageModelConfig(vocab_size=5, embed_dim=8, hidden_size=8, tie_weights=True))
    assert lm.head.weight is lm.embedding.weight


# -- classifier ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell,bidirectional,pooling,layers", [
    ("lstm", False, "last", 1), ("lstm", True, "last", 2), ("gru", True, "mean", 1), ("rnn", False, "max", 2),
    ("gru", False, "max", 1), ("lstm", True, "mean", 1), ("mingru", True, "last", 2), ("minlstm", True, "mean", 1),
    ("minlstm", False, "max", 2)])
def test_classifier_padding_never_influences_the_result(cell, bidirectional, pooling, layers):
    cfg = ClassifierConfig(vocab_size=20, num_classes=3, embed_dim=8, hidden_size=12, num_layers=layers,
                           cell=cell, bidirectional=bidirectional, pooling=pooling, dropout=0.3)
    model = SequenceClassifier(cfg).eval()
    seqs = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13]]
    tokens, lengths = pad_batch(seqs, pad_id=0)                           # (4, 5)
    base = model(tokens, lengths)
    assert base.shape == (4, 3)
    padded = torch.cat([tokens, torch.zeros(4, 6, dtype=torch.long)], 1)  # 6 more padded steps
    assert (model(padded, lengths) - base).abs().max() < 1e-6
    garbage = padded.clone()                                               # padded steps hold real tokens
    real = torch.arange(11) < lengths[:, None]
    garbage[~real] = torch.randint(1, 20, (int((~real).sum()),))
    assert (model(garbage, lengths) - base).abs().max() < 1e-6
    alone = model(torch.tensor([seqs[1]]), torch.tensor([2]))             # same as inside the batch
    assert (alone[0] - base[1]).abs().max() < 1e-6
    probs = model.predict_proba(tokens, lengths)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))


def test_classifier_config_is_validated():
    with pytest.raises(UserError, match="pooling must be one of last, mean, max"):
        ClassifierConfig(vocab_size=5, num_classes=2, pooling="attention")
    with pytest.raises(UserError, match="num_classes must be >= 2"):
        ClassifierConfig(vocab_size=5, num_classes=1)


# -- seq2seq ---------------------------------------------------------------------------------------------

def _s2s(vocab, attention=True, cell="gru", hidden=64):
    return Seq2Seq(Seq2SeqConfig(len(vocab), len(vocab), vocab.bos_id, vocab.eos_id, vocab.pad_id,
                                 embed_dim=16, hidden_size=hidden, cell=cell, attention=attention))


@pytest.mark.parametrize("attention,cell", [(True, "gru"), (False, "lstm"), (True, "minlstm"), (False, "mingru")])
def test_seq2seq_shapes_padding_and_step_by_step_decoding(attention, cell):
    pairs = reversal_pairs(5, seed=0)
    vocab = build_vocab(pairs)
    model = _s2s(vocab, attention, cell).eval()
    b = collate(pairs, vocab)
    logits = model(b.src, b.src_lengths, b.tgt_in)
    assert logits.shape == (*b.tgt_in.shape, len(vocab))
    more = torch.cat([b.src, torch.zeros(5, 4, dtype=torch.long)], 1)      # extra source padding
    assert (model(more, b.src_lengths, b.tgt_in) - logits).abs().max() < 1e-6
    memory, state, mask = model.encode(b.src, b.src_lengths)               # one step at a time = all at once
    steps = []
    for t in range(b.tgt_in.shape[1]):
        out, state = model.decode(b.tgt_in[:, t: t + 1], state, memory, mask)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), logits, atol=1e-5, rtol=0)


def test_tiny_seq2seq_overfits_reversal():
    torch.manual_seed(0)
    pairs = reversal_pairs(8, seed=3, min_len=5, max_len=8)
    vocab = build_vocab(pairs)
    model = _s2s(vocab)
    b = collate(pairs, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(100):            # exact from step 20-30 for torch seeds 0-4
        loss = F.cross_entropy(model(b.src, b.src_lengths, b.tgt_in).flatten(0, 1), b.tgt_out.flatten(),
                               ignore_index=vocab.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    ids, lengths = model.greedy_decode(b.src, b.src_lengths, max_len=12)
    assert lengths.tolist() == [len(t) for _, t in pairs]
    assert ["".join(vocab.decode(ids[i, : lengths[i]].tolist())) for i in range(8)] == [t for _, t in pairs]
    assert (ids[0, lengths[0]:] == vocab.pad_id).all()


def _greedy_by_decode_calls(model, src, src_lengths, max_len, seen):
    """What greedy_decode did before it streamed: decode() called on each new token."""
    c, B = model.config, src.shape[0]
    with torch.no_grad():
        memory, state, mask = model.eval().encode(src, src_lengths)
        prev = torch.full((B, 1), c.bos_id, dtype=torch.long)
        ids = torch.full((B, max_len), c.pad_id, dtype=torch.long)
        lengths = torch.full((B,), max_len, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        for t in range(max_len):
            logits, state = model.decode(prev, state, memory, mask)
            seen.append(logits[:, 0].clone())
            prev = logits.argmax(-1)
            ended = ~done & (prev[:, 0] == c.eos_id)
            lengths[ended] = t
            done |= ended
            ids[:, t] = prev[:, 0].masked_fill(done, c.pad_id)
            if bool(done.all()):
                break
    return ids, lengths


@pytest.mark.parametrize("cell,attention,eos_bias", [("gru", True, 1.0), ("lstm", False, 0.0), ("rnn", True, 1.0),
                                                     ("mingru", True, 1.0), ("minlstm", False, 3.0)])
def test_greedy_decode_streams_the_same_tokens_as_calling_decode(cell, attention, eos_bias):
    """Streamed decoding: same ids and lengths as decode() per step, each argmax over the same logits
    (to float32 rounding); sequences end at different steps, so the <eos> bookkeeping is exercised."""
    pairs = reversal_pairs(16, seed=1)
    vocab = build_vocab(pairs)
    torch.manual_seed(5)
    model = Seq2Seq(Seq2SeqConfig(len(vocab), len(vocab), vocab.bos_id, vocab.eos_id, vocab.pad_id, embed_dim=8,
                                  hidden_size=16, num_layers=2, cell=cell, attention=attention, dropout=0.3))
    with torch.no_grad():                          # larger weights: varied tokens instead of one repeated
        for p in model.parameters():
            p.mul_(3)
        model.head.bias[vocab.eos_id] += eos_bias
    b = collate(pairs, vocab)
    seen = []
    readout = model._readout
    model._readout = lambda *a: seen.append(readout(*a)[:, 0].clone()) or seen[-1][:, None]
    model.train()                                  # greedy_decode switches dropout off and back on
    ids, lengths = model.greedy_decode(b.src, b.src_lengths, 10)
    assert model.training
    del model._readout
    ref_seen = []
    ref_ids, ref_lengths = _greedy_by_decode_calls(model, b.src, b.src_lengths, 10, ref_seen)
    assert torch.equal(ids, ref_ids) and torch.equal(lengths, ref_lengths)
    assert 0 < int((lengths < 10).sum()) < 16 and len(set(lengths.tolist())) >= 3
    torch.testing.assert_close(torch.stack(seen), torch.stack(ref_seen), rtol=1e-5, atol=1e-5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):   # decoding runs in the weights' dtype
        assert torch.equal(model.greedy_decode(b.src, b.src_lengths, 10)[0], ids)
    with pytest.raises(ValueError, match="lengths must lie in"):
        model.greedy_decode(b.src, b.src_lengths + 100, 10)
    assert model.training                          # also after an error


def test_decoding_calls_on_one_model_from_two_threads_take_turns():
    """sample()/greedy_decode() switch the model to eval and back: a second thread's call waits for the
    first (they had raced: a model left in eval for the rest of training, or a stream refusing train mode)."""
    import threading

    from rnnkit.models.language import decoding
    lm = _tiny_lm().train()
    inside, release, entered = threading.Event(), threading.Event(), []

    def first():
        with decoding(lm, "cpu"):
            inside.set()
            release.wait(10)
            entered.append(("first", lm.training))

    def second():
        with decoding(lm, "cpu"):
            entered.append(("second", lm.training))

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.2)
    assert b.is_alive() and entered == []                      # waits while the first is inside
    release.set()
    a.join(10)
    b.join(10)
    assert entered == [("first", False), ("second", False)] and lm.training
    with decoding(_tiny_lm(), "cpu"):                          # another model does not wait for this one
        pass


def test_sampling_arguments_must_be_ints_not_bools():
    lm = _tiny_lm()
    with pytest.raises(UserError, match="top_k must be a positive integer"):
        lm.sample([3], 5, top_k=True)
    with pytest.raises(UserError, match=r"suppress_ids must be token ids \(ints\)"):
        lm.sample([3], 5, suppress_ids=[True])
    got = lm.sample([3], 5, temperature=0, suppress_ids=torch.tensor([0, 1]), top_k=torch.tensor(3))
    assert len(got) == 5 and not {0, 1} & set(got)


def test_suppress_ids_may_be_an_iterator():
    """An iterator was read up by the checks, so nothing was suppressed."""
    lm = _tiny_lm()
    free = lm.sample([3], 12, temperature=0)
    banned = set(free[:2])
    got = lm.sample([3], 12, temperature=0, suppress_ids=iter(sorted(banned)))
    assert not banned & set(got)
