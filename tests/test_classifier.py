"""lstmkit.LSTMClassifier: shapes, logits vs probabilities, padding never read, and it learns."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from tolerances import assert_close


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_shapes_logits_and_probabilities(bidirectional, batch_first):
    torch.manual_seed(0)
    m = lstmkit.LSTMClassifier(3, 5, 2, 4, bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn(6, 10, 3) if batch_first else torch.randn(10, 6, 3)
    logits = m(x)
    assert logits.shape == (6, 4)
    probs = m.predict_proba(x)
    assert probs.shape == (6, 4)
    assert_close(probs.sum(1), torch.ones(6))
    assert_close(probs, torch.softmax(logits.detach(), 1))
    assert (logits.detach() < 0).any()  # logits, not probabilities


def test_tutorial_shapes_and_last_step():
    torch.manual_seed(0)
    m = lstmkit.LSTMClassifier(3, 5, 2, 2)
    x = torch.randn(10, 5, 3)
    out, _ = m.lstm(x)
    # without lengths, the tutorial's output[-1]
    assert_close(m(x), m.fc(out[-1]))


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "last+mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("form", ["lengths", "packed"])
def test_padding_never_leaks(bidirectional, form, pooling):
    torch.manual_seed(0)
    m = lstmkit.LSTMClassifier(3, 6, 2, 3, bidirectional=bidirectional, pooling=pooling).eval()
    lengths = [4, 9, 2, 7]
    seqs = [torch.randn(n, 3) for n in lengths]
    x = torch.zeros(9, 4, 3)
    for i, s in enumerate(seqs):
        x[: len(s), i] = s
    x_garbage = x.clone()
    for i, n in enumerate(lengths):
        x_garbage[n:, i] = 1e3  # padding with huge values must change nothing
    if form == "packed":
        batch = m(pack_padded_sequence(x_garbage, lengths, enforce_sorted=False))
    else:
        batch = m(x_garbage, lengths=lengths)
    for i, s in enumerate(seqs):
        alone = m(s.unsqueeze(1))
        assert_close(batch[i : i + 1], alone, msg=f"sequence {i}")
    # and the padded batch read without lengths is different (the tutorial's bug)
    assert not torch.allclose(m(x_garbage), batch)


def test_bidirectional_features_are_last_forward_and_first_backward():
    torch.manual_seed(0)
    m = lstmkit.LSTMClassifier(2, 4, 1, 2, bidirectional=True).eval()
    x = torch.randn(7, 3, 2)
    lengths = [7, 3, 5]
    out, _ = m.lstm(x, lengths=lengths)
    feats = m.features(x, lengths)
    for i, n in enumerate(lengths):
        assert_close(feats[i, :4], out[n - 1, i, :4])  # forward direction at the last valid step
        assert_close(feats[i, 4:], out[0, i, 4:])      # backward direction at step 0


@pytest.mark.parametrize("batch_first", [False, True])
def test_pooling_features(batch_first):
    torch.manual_seed(0)
    lengths = [7, 3, 5]
    x = torch.randn(3, 7, 2) if batch_first else torch.randn(7, 3, 2)
    feats = {}
    for pooling in ("last", "mean", "max", "last+mean"):
        m = lstmkit.LSTMClassifier(2, 4, 1, 2, bidirectional=True, pooling=pooling, batch_first=batch_first)
        torch.manual_seed(1)
        m.lstm.reset_parameters()
        feats[pooling] = m.features(x, lengths)
        out, _ = m.lstm(x, lengths=lengths)
        out = out.transpose(0, 1) if batch_first else out
    for i, n in enumerate(lengths):
        assert_close(feats["mean"][i], out[:n, i].mean(0))
        assert_close(feats["max"][i], out[:n, i].amax(0))
    assert_close(feats["last+mean"], torch.cat([feats["last"], feats["mean"]], 1))
    assert m.fc.in_features == 16


def test_classifier_errors():
    with pytest.raises(ValueError, match=r"pooling: expected one of .*got 'sum'"):
        lstmkit.LSTMClassifier(3, 4, 1, 2, pooling="sum")
    with pytest.raises(ValueError, match="output_size: expected a positive int"):
        lstmkit.LSTMClassifier(3, 4, 1, 0)
    m = lstmkit.LSTMClassifier(3, 4, 1, 2)
    with pytest.raises(ValueError, match="x: expected a batched 3-D tensor, got 2-D"):
        m(torch.zeros(5, 3))


def test_learns_a_synthetic_task():
    """Class = sign of the sum of the first feature over a variable-length sequence."""
    g = torch.Generator().manual_seed(0)
    N, T = 512, 12
    lengths = torch.randint(3, T + 1, (N,), generator=g)
    x = torch.randn(T, N, 2, generator=g)
    mask = (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
    x = x * mask
    y = (x[:, :, 0].sum(0) > 0).long()
    torch.manual_seed(0)
    m = lstmkit.LSTMClassifier(2, 16, 1, 2)
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(6):
        for i in range(0, 384, 64):
            opt.zero_grad()
            loss = loss_fn(m(x[:, i : i + 64], lengths[i : i + 64]), y[i : i + 64])
            loss.backward()
            opt.step()
    m.eval()
    acc = (m(x[:, 384:], lengths[384:]).argmax(1) == y[384:]).float().mean().item()
    assert acc >= 0.9, acc
