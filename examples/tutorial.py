"""The tutorial (../shared/reference), end to end on lstmkit.

1. Build an LSTM with (input_size, hidden_size, num_layers) and run it on a (seq_len, batch,
   input_size) batch with an (h0, c0) tuple; print the shapes the tutorial describes.
2. Its LSTMClassifier, on lstmkit: logits out, last *valid* step of each sequence.
3. Train that classifier on a small synthetic task with variable-length sequences and report accuracy.

Run: python examples/tutorial.py
"""

import time

import torch

import lstmkit


def walkthrough() -> None:
    print("== 1. the LSTM layer ==")
    lstm = lstmkit.LSTM(input_size=3, hidden_size=5, num_layers=2)
    print(lstm)
    input_data = torch.randn(10, 5, 3)            # (seq_length, batch_size, input_size)
    h0 = torch.zeros(2, 5, 5)                     # (num_layers, batch_size, hidden_size)
    c0 = torch.zeros(2, 5, 5)
    output, (h_n, c_n) = lstm(input_data, (h0, c0))
    print("input ", tuple(input_data.shape), "(seq_length, batch_size, input_size)")
    print("output", tuple(output.shape), "(seq_length, batch_size, hidden_size): top layer, every step")
    print("h_n   ", tuple(h_n.shape), "(num_layers, batch_size, hidden_size)")
    print("c_n   ", tuple(c_n.shape), "(num_layers, batch_size, hidden_size)")
    ref = torch.nn.LSTM(3, 5, 2)                  # the same weights in torch give the same numbers
    ref.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        dev = float((ref(input_data, (h0, c0))[0] - output).abs().max())
    print("max |lstmkit - torch.nn.LSTM| =", dev)
    print(f"backend: {lstm.backend!r} -> {lstm.resolved_backend()!r}; available: {lstmkit.available_backends()}")

    print("\n== 2. the classifier ==")
    model = lstmkit.LSTMClassifier(input_size=3, hidden_size=5, num_layers=2, output_size=2)
    logits = model(input_data)
    print("logits", tuple(logits.shape), "(batch_size, output_size)")
    print("probabilities:\n", model.predict_proba(input_data))


def make_task(n: int, T: int, g: torch.Generator):
    """Label = 1 if the sequence's first feature sums above zero; lengths vary from 3 to T."""
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    x = torch.randn(T, n, 3, generator=g)
    x = x * (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
    y = (x[:, :, 0].sum(0) > 0).long()
    return x, lengths, y


def train() -> float:
    print("\n== 3. training on a synthetic task ==")
    g = torch.Generator().manual_seed(0)
    x_tr, len_tr, y_tr = make_task(1024, 20, g)
    x_te, len_te, y_te = make_task(512, 20, g)
    torch.manual_seed(0)
    model = lstmkit.LSTMClassifier(3, 32, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()       # expects logits: the model returns logits
    t0 = time.perf_counter()
    for epoch in range(8):
        model.train()
        perm = torch.randperm(1024, generator=g)
        for i in range(0, 1024, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(x_tr[:, idx], len_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_te, len_te).argmax(1) == y_te).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test accuracy {acc:.3f}")
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    return acc


if __name__ == "__main__":
    torch.manual_seed(0)
    walkthrough()
    train()
