# Mirrors kernels/infonce_bank.cu's tiled kernels thread by thread (numpy over the 256 threads of a block)
# to check the index arithmetic against a direct evaluation, on a machine without a GPU (the CUDA parity
# test is the real check). Run: python reference/infonce_tiles_sim.py (numpy; a few minutes).
import numpy as np
TQ, TC, DCH, RANGE, DQ = 64, 64, 32, 1024, 256
rng = np.random.default_rng(0)

def tile_logits(q, cols, b, ncols, d, q0, c0):
    tx = np.arange(256) % 16; ty = np.arange(256) // 16
    acc = np.zeros((256, 4, 4), np.float32)
    for a in range(4):
        for j in range(4):
            qi = q0 + ty + 16 * a; c = c0 + tx + 16 * j
            qv = np.where((qi < b)[:, None], q[np.minimum(qi, b - 1)], 0)
            cv = np.where((c < ncols)[:, None], cols[np.minimum(c, len(cols) - 1)], 0)
            acc[:, a, j] = (qv.astype(np.float32) * cv.astype(np.float32)).sum(1)
    return acc

def forward(q, k, bank, bank_users, users, tau):
    b, d = q.shape; nb = len(bank_users); ncols = b + nb
    cols = np.concatenate([k, bank]) if nb else k
    nranges = -(-ncols // RANGE); qtiles = -(-b // TQ)
    pm = np.full((b, nranges), -np.inf); ps = np.zeros((b, nranges))
    tx = np.arange(256) % 16; ty = np.arange(256) // 16
    for r in range(nranges):
        for qt in range(qtiles):
            q0 = qt * TQ; cbeg = r * RANGE; cend = min(cbeg + RANGE, ncols)
            m = np.full((256, 4), -np.inf); s = np.zeros((256, 4))
            uq = np.array([[users[q0 + t // 16 + 16 * a] if q0 + t // 16 + 16 * a < b else 0 for a in range(4)] for t in range(256)])
            for c0 in range(cbeg, cend, TC):
                acc = tile_logits(q, cols, b, cend, d, q0, c0)
                for t in range(256):
                    for j in range(4):
                        c = c0 + tx[t] + 16 * j
                        if c >= cend: continue
                        for a in range(4):
                            inc = c < b or bank_users[c - b] == 0 or bank_users[c - b] != uq[t, a]
                            if inc:
                                l = acc[t, a, j] / tau
                                if l > m[t, a]: s[t, a] = s[t, a] * np.exp(m[t, a] - l) + 1; m[t, a] = l
                                else: s[t, a] += np.exp(l - m[t, a])
            for a in range(4):
                for t0 in range(0, 256, 16):
                    grp = range(t0, t0 + 16)
                    mx = max(m[t, a] for t in grp)
                    sm = sum(s[t, a] * np.exp(m[t, a] - mx) if s[t, a] > 0 else 0 for t in grp)
                    qi = q0 + t0 // 16 + 16 * a
                    if qi < b: pm[qi, r] = mx; ps[qi, r] = sm
    lse = np.zeros(b)
    for i in range(b):
        ok = ps[i] > 0; mx = pm[i][ok].max(); lse[i] = mx + np.log((ps[i][ok] * np.exp(pm[i][ok] - mx)).sum())
    pos = (q * k).sum(1) / tau
    return lse, pos

def dq_sim(q, k, bank, bank_users, users, tau, lse):
    b, d = q.shape; nb = len(bank_users); ncols = b + nb
    cols = np.concatenate([k, bank]) if nb else k
    nranges = -(-ncols // RANGE); qtiles = -(-b // TQ)
    part = np.zeros((nranges, b, d))
    tx = np.arange(256) % 16; ty = np.arange(256) // 16
    for r in range(nranges):
        for qt in range(qtiles):
            q0 = qt * TQ; cbeg = r * RANGE; cend = min(cbeg + RANGE, ncols)
            for x0 in range(0, d, DQ):
                acc_dq = np.zeros((256, 4, DQ // 16))
                for c0 in range(cbeg, cend, TC):
                    acc = tile_logits(q, cols, b, cend, d, q0, c0)
                    ws = np.zeros((TQ, TC))
                    for t in range(256):
                        for a in range(4):
                            qi = q0 + ty[t] + 16 * a
                            for j in range(4):
                                c = c0 + tx[t] + 16 * j; w = 0.0
                                if qi < b and c < cend and (c < b or bank_users[c - b] == 0 or bank_users[c - b] != users[qi]):
                                    w = np.exp(acc[t, a, j] / tau - lse[qi])
                                    if c == qi: w -= 1
                                ws[ty[t] + 16 * a, tx[t] + 16 * j] = w
                    for xs in range(0, DQ, DCH):
                        cs = np.zeros((TC, DCH))
                        for tt in range(TC):
                            for x in range(DCH):
                                c = c0 + tt; xx = x0 + xs + x
                                cs[tt, x] = cols[c, xx] if (c < cend and xx < d) else 0
                        for t in range(256):
                            for a in range(4):
                                w = ws[ty[t] + 16 * a]
                                acc_dq[t, a, xs // 16] += (w * cs[:, tx[t]]).sum()
                                acc_dq[t, a, xs // 16 + 1] += (w * cs[:, tx[t] + 16]).sum()
                for t in range(256):
                    for a in range(4):
                        qi = q0 + ty[t] + 16 * a
                        for jj in range(DQ // 16):
                            xx = x0 + 16 * jj + tx[t]
                            if qi < b and xx < d: part[r, qi, xx] = acc_dq[t, a, jj]
    return part.sum(0) / tau / b

def direct(q, k, bank, bank_users, users, tau):
    b, d = q.shape
    loss = 0; dq = np.zeros_like(q)
    for i in range(b):
        cols = [k[j] for j in range(b)] + [bank[s] for s in range(len(bank_users)) if bank_users[s] == 0 or bank_users[s] != users[i]]
        C = np.array(cols); l = C @ q[i] / tau; mx = l.max(); lse = mx + np.log(np.exp(l - mx).sum())
        loss += lse - l[i]
        p = np.exp(l - lse); dq[i] = (p @ C - k[i]) / tau / b
    return loss / b, dq

def norm(x): return x / np.linalg.norm(x, axis=1, keepdims=True)
for (b, nb, d) in [(1, 1, 1), (7, 100, 33), (5, 70, 300), (70, 1100, 20)]:
    q = norm(rng.normal(size=(b, d))); k = norm(rng.normal(size=(b, d))); bank = norm(rng.normal(size=(nb, d)))
    users = rng.integers(1, 5, size=b); bank_users = rng.integers(0, 5, size=nb); tau = 0.07
    lse, pos = forward(q, k, bank, bank_users, users, tau)
    loss = (lse - pos).mean()
    want, want_dq = direct(q, k, bank, bank_users, users, tau)
    got_dq = dq_sim(q, k, bank, bank_users, users, tau, lse)
    print(b, nb, d, "loss", loss, want, "rel", abs(loss - want) / abs(want), "dq rel", np.linalg.norm(got_dq - want_dq) / np.linalg.norm(want_dq))
