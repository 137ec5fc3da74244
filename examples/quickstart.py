"""The README's usage example, runnable as is: a small regression trained with Lion8bit."""

import torch

from lion8bit import Lion8bit

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
optimizer = Lion8bit(model.parameters(), lr=3e-4, weight_decay=0.1)  # lr 3-10x below AdamW's
x = torch.randn(1024, 64)
y = torch.sin(x @ torch.randn(64, 1) / 8)  # a smooth target the model can learn
for step in range(301):
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")

state = sum(t.nbytes for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t))
print(f"optimizer state: {state:,} bytes for {sum(p.numel() for p in model.parameters()):,} parameters")
