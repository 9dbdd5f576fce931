"""Sigmoid at depth 10,000: what does the top of a critical_ net carry, and which optimizer setting trains it."""
import sys, time, json, math
import torch
from torch import nn
import signalprop as sp
from signalprop.lab.datasets import digits
from signalprop.lab.models import DeepMLP
from signalprop.lab.train import accuracy
torch.set_num_threads(1)
mode = sys.argv[1]
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 200
data = digits(0)
torch.manual_seed(0)
m = DeepMLP(depth, 64, "sigmoid", data.n_features, data.n_classes)
g = torch.Generator().manual_seed(0)
sp.init.critical_(m, data.x_train[:256], generator=g)
t0 = time.time()
def feats(x):
    mods = list(m)
    with torch.no_grad():
        for i in range(0, len(mods) - 1, 2):
            x = torch.sigmoid(nn.functional.linear(x, mods[i].weight, mods[i].bias))
    return x
if mode == "probe":
    from sklearn.linear_model import LogisticRegression
    ftr, fte = feats(data.x_train), feats(data.x_test)
    print("feature std", float(ftr.std(0).mean()), "mean", float(ftr.mean()))
    z = (ftr - ftr.mean(0)) / (ftr.std(0) + 1e-12)
    zt = (fte - ftr.mean(0)) / (ftr.std(0) + 1e-12)
    clf = LogisticRegression(max_iter=2000).fit(z.numpy(), data.y_train.numpy())
    print("linear probe test acc", clf.score(zt.numpy(), data.y_test.numpy()), time.time() - t0)
    sys.exit()
hidden = [p for mod in list(m)[:-1] for p in mod.parameters()]
head = list(list(m)[-1].parameters())
opt_name, lr_h, lr_o = mode.split(":")[0], float(mode.split(":")[1]), float(mode.split(":")[2])
groups = [{"params": hidden, "lr": lr_h}, {"params": head, "lr": lr_o}]
opt = torch.optim.Adam(groups) if opt_name == "adam" else torch.optim.SGD(groups, momentum=0.9)
n = data.x_train.shape[0]
gen = torch.Generator().manual_seed(0)
for step in range(steps):
    idx = torch.randint(0, n, (128,), generator=gen)
    loss = nn.functional.cross_entropy(m.fast_forward(data.x_train[idx]), data.y_train[idx])
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 25 == 0 or step == steps - 1:
        print(step, round(float(loss), 4), "val", round(accuracy(m, data.x_val, data.y_val), 4), round(time.time() - t0), flush=True)
print("test", accuracy(m, data.x_test, data.y_test))
