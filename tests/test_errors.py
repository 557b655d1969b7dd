"""Bad input raises ValueError or TypeError naming the argument, what it got and what was expected."""
import pytest
import torch

import rnnkit as rk

X = torch.randn(6, 2, 4)                                  # (T, B, I) = (6, 2, 4)
H5 = torch.zeros(1, 2, 5)


def _call(make, *args, **kw):
    """A call-time case, run on both paths: validation happens before either."""
    return lambda backend: make(backend=backend)(*args, **kw)


def gru(**kw):
    return rk.GRU(4, 5, **kw)


def lstm(**kw):
    return rk.LSTM(4, 5, **kw)


def rnn(**kw):
    return rk.RNN(4, 5, **kw)


CALL_CASES = {
    "input 4-D": (_call(gru, torch.randn(2, 3, 4, 4)), ValueError,
                  r"GRU: input must be 3-D \(T, B, input_size\).*got 4-D shape \(2, 3, 4, 4\)"),
    "input 1-D batch_first": (_call(lambda **k: gru(batch_first=True, **k), torch.randn(4)), ValueError,
                              r"3-D \(B, T, input_size\) or 2-D.*got 1-D shape \(4,\)"),
    "input not a tensor": (_call(gru, [[0.0] * 4]), TypeError, r"input must be a torch.Tensor, got list"),
    "feature size": (_call(lstm, torch.randn(6, 2, 3)), ValueError,
                     r"LSTM: input has 3 features.*shape \(6, 2, 3\).*input_size=4"),
    "dtype": (_call(rnn, X.double()), TypeError, r"RNN: input dtype torch.float64 does not match.*torch.float32"),
    "h_0 shape": (_call(lambda **k: gru(num_layers=2, **k), X, H5), ValueError,
                  r"initial state h_0 must have shape \(2, 2, 5\).*got \(1, 2, 5\)"),
    "c_0 shape": (_call(lstm, X, (H5, torch.zeros(1, 3, 5))), ValueError,
                  r"initial state c_0 must have shape \(1, 2, 5\).*got \(1, 3, 5\)"),
    "h_0 unbatched": (_call(gru, torch.randn(6, 4), H5), ValueError,
                      r"h_0 must have shape \(1, 5\).*got \(1, 2, 5\)"),
    "h_0 bidirectional": (_call(lambda **k: rnn(bidirectional=True, **k), X, H5), ValueError,
                          r"h_0 must have shape \(2, 2, 5\).*got \(1, 2, 5\)"),
    "LSTM hx a tensor": (_call(lstm, X, H5), ValueError, r"LSTM: hx must be a tuple \(h_0, c_0\) of two tensors, got Tensor"),
    "LSTM hx 3 parts": (_call(lstm, X, (H5, H5, H5)), ValueError, r"hx must be a tuple \(h_0, c_0\) of two tensors, got a tuple of length 3"),
    "RNN hx a tuple": (_call(rnn, X, (H5,)), ValueError, r"h_0 must have shape \(1, 2, 5\).*got tuple"),
    "lengths size": (_call(gru, X, lengths=torch.tensor([3])), ValueError,
                     r"lengths must be 1-D with one entry per sequence \(batch size 2\), got shape \(1,\)"),
    "lengths 2-D": (_call(gru, X, lengths=torch.tensor([[3, 2]])), ValueError, r"lengths.*got shape \(1, 2\)"),
    "lengths batch_first": (_call(lambda **k: gru(batch_first=True, **k), X, lengths=torch.tensor([1, 2])),
                            ValueError, r"batch size 6\), got shape \(2,\)"),
    "lengths zero": (_call(gru, X, lengths=torch.tensor([0, 3])), ValueError,
                     r"lengths must lie in \[1, T=6\], got min 0 and max 3"),
    "lengths above T": (_call(lstm, X, lengths=[7, 3]), ValueError, r"lengths must lie in \[1, T=6\], got min 3 and max 7"),
    "lengths float": (_call(gru, X, lengths=torch.tensor([2.0, 3.0])), TypeError,
                      r"lengths must be integers, got dtype torch.float32"),
    "lengths bool": (_call(gru, X, lengths=torch.tensor([True, True])), TypeError, r"lengths.*torch.bool"),
    "no time steps": (_call(gru, torch.randn(0, 2, 4)), ValueError,
                      r"GRU: input has no time steps \(T = 0 in shape \(0, 2, 4\)\); give each sequence at least one step"),
    "no time steps batch_first": (_call(lambda **k: lstm(batch_first=True, **k), torch.randn(2, 0, 4)), ValueError,
                                  r"LSTM: input has no time steps \(T = 0 in shape \(2, 0, 4\)\)"),
    "no time steps unbatched": (_call(rnn, torch.randn(0, 4)), ValueError, r"RNN: input has no time steps"),
    "padding": (_call(gru, X, padding="middle"), ValueError, r"padding must be 'right' or 'left', got 'middle'"),
    "truncate 0": (_call(gru, X, truncate=0), ValueError, r"truncate must be a positive int.*got 0"),
    "truncate negative": (_call(lstm, X, truncate=-3), ValueError, r"truncate must be a positive int.*got -3"),
    "truncate float": (_call(rnn, X, truncate=2.5), ValueError, r"truncate must be a positive int.*got 2.5"),
}


@pytest.mark.parametrize("backend", ("engine", "native"))
@pytest.mark.parametrize("case", CALL_CASES)
def test_bad_call_argument(case, backend):
    call, exc, pattern = CALL_CASES[case]
    with pytest.raises(exc, match=pattern):
        call(backend)


BUILD_CASES = {
    "nonlinearity": (lambda: rk.RNN(4, 5, nonlinearity="sigmoid"), ValueError,
                     r"RNN: nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    "zoneout 1": (lambda: gru(zoneout=1.0), ValueError, r"zoneout must be a float in \[0, 1\).*got 1.0"),
    "zoneout negative": (lambda: rnn(zoneout=-0.1), ValueError, r"zoneout must be a float in \[0, 1\).*got -0.1"),
    "zoneout count": (lambda: lstm(zoneout=(0.1,)), ValueError, r"zoneout.*2 such floats.*got \(0.1,\)"),
    "zoneout count GRU": (lambda: gru(zoneout=(0.1, 0.2)), ValueError, r"zoneout.*1 such floats.*got \(0.1, 0.2\)"),
    "zoneout LSTM c": (lambda: lstm(zoneout=(0.1, 1.5)), ValueError, r"zoneout.*got \(0.1, 1.5\)"),
    "recurrent_dropout 1": (lambda: gru(recurrent_dropout=1.0), ValueError,
                            r"recurrent_dropout must be in \[0, 1\), got 1.0"),
    "recurrent_dropout negative": (lambda: lstm(recurrent_dropout=-0.2), ValueError,
                                   r"recurrent_dropout must be in \[0, 1\), got -0.2"),
    "proj_size": (lambda: lstm(proj_size=5), ValueError, r"proj_size has to be smaller than hidden_size"),
    "backend": (lambda: gru(backend="cuda"), ValueError, r"backend must be one of \('auto', 'engine', 'native'\), got 'cuda'"),
}


@pytest.mark.parametrize("case", BUILD_CASES)
def test_bad_constructor_argument(case):
    build, exc, pattern = BUILD_CASES[case]
    with pytest.raises(exc, match=pattern):
        build()


@pytest.mark.parametrize("what", ["left padding", "truncate", "zoneout", "trace"])
def test_native_backend_refuses_what_needs_the_engine(what):
    m = gru(backend="native", zoneout=0.1 if what == "zoneout" else 0.0)
    kw = dict(lengths=torch.tensor([6, 2]), padding="left") if what == "left padding" else (
        dict(truncate=2) if what == "truncate" else {})
    with pytest.raises(ValueError, match=r"backend='native' cannot run this configuration"):
        if what == "trace":
            with rk.trace(m):
                m(X)
        else:
            m(X, **kw)


# -- gaps found while writing these tests, now fixed: each guards against coming back ---------------

def test_proj_size_builds_a_projected_lstm():            # it was refused before rk.LSTM took proj_size
    out, (h, c) = lstm(proj_size=3)(X)
    assert out.shape[-1] == 3 and h.shape[-1] == 3 and c.shape[-1] == 5


def test_lstm_hx_not_iterable_names_hx():
    with pytest.raises((TypeError, ValueError), match=r"hx"):
        lstm()(X, 7)


def test_truncate_bool_is_rejected():
    with pytest.raises(ValueError, match=r"truncate.*got True"):
        gru(backend="engine")(X, truncate=True)


@pytest.mark.parametrize("backend", ("engine", "native"))
def test_hx_dtype_mismatch_names_h0(backend):
    with pytest.raises(TypeError, match=r"h_0.*torch.float64"):
        gru(backend=backend)(X, H5.double())


def test_zoneout_string_names_zoneout():
    with pytest.raises((TypeError, ValueError), match=r"zoneout.*'a'"):
        gru(zoneout="a")
