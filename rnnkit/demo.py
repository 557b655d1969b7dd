"""`make demo` until the forecasting task lands: an LSTM learns a noisy sine, its loss printed as it falls."""
import math

import torch

import rnnkit as rk


def main(steps: int = 300, seed: int = 0) -> None:
    torch.manual_seed(seed)
    t = torch.arange(0, 2000, dtype=torch.float32)
    series = torch.sin(2 * math.pi * t / 50) + 0.05 * torch.randn_like(t)
    L = 40
    windows = series.unfold(0, L + 1, 1)                              # (N, L+1) overlapping windows
    x, y = windows[:, :L, None], windows[:, L:]
    lstm, head = rk.LSTM(1, 32, batch_first=True), torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-2)
    for step in range(steps + 1):
        idx = torch.randint(0, len(x), (64,))
        out, _ = lstm(x[idx])
        loss = torch.nn.functional.mse_loss(head(out[:, -1]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step:4d}  mse {loss.item():.4f}")


if __name__ == "__main__":
    main()
