"""The README's usage example, runnable as is: a small regression trained with Lion8bit."""

import torch
from lion8bit import Lion8bit

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
optimizer = Lion8bit(model.parameters(), lr=3e-4, weight_decay=0.1)  # lr 3-10x below AdamW's
x, y = torch.randn(1024, 64), torch.randn(1024, 64).sum(1, keepdim=True).sin()
for step in range(301):
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")

state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
params = sum(p.numel() for p in model.parameters())
print(f"optimizer state: {state_bytes:,} bytes for {params:,} parameters ({state_bytes / params:.2f} B/param)")
