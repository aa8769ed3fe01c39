import torch, cohere_fx.ops
from cohere_fx.ops import cross_entropy as ce
n, v, h = 4096, 256000, 4096
hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
lab = torch.randint(0, v, (n,), device="cuda")
torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
def mark(tag): print(tag, (torch.cuda.memory_allocated() - base) / 2**30, (torch.cuda.max_memory_allocated() - base) / 2**30, flush=True)
torch.cuda.reset_peak_memory_stats()
loss = torch.ops.cohere_fx.linear_cross_entropy(hid, w, lab, 0.25, -100); torch.cuda.synchronize(); mark("after fwd")
g = torch.autograd.grad(loss, (hid, w)); torch.cuda.synchronize(); mark("after bwd")
del g, loss
torch.cuda.reset_peak_memory_stats()
buf = hid.new_empty((1024, v)); dw = torch.empty_like(w); mark("buf+dw")
torch.mm(buf.t(), hid[:1024].detach(), out=dw); torch.cuda.synchronize(); mark("mm out")
dw.addmm_(buf.t(), hid[:1024].detach()); torch.cuda.synchronize(); mark("addmm_")
