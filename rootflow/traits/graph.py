"""Skeleton -> graph of branches: tips, branch points, spur pruning, per-step length and width.

The skeleton is cut at its nodes: *tips* (one neighbour), *junctions* (clusters of adjacent
pixels with three or more neighbours, one node per cluster, placed at the cluster centroid)
and isolated pixels. Branches are the pixel chains between nodes; chains without any node
are closed loops (a ring-shaped root), which RhizoVision Explorer gives zero length and we
measure like any other branch.

Spur pruning, iterated until nothing changes: a terminal branch (tip to junction) is a spur
when it reaches less than ``prune_px`` beyond the inscribed disc of the junction it hangs
from, i.e. ``branch_length + r_tip - r_junction < prune_px``. Boundary bumps on wide roots
make long skeleton branches that barely leave the parent root; measuring the protrusion
rather than the raw branch length removes them at any root width, while a real lateral root
that sticks out is kept. When every branch at a junction is a spur, the two longest stay (the
component keeps its main axis), so pruning never deletes a root.

Each surviving branch yields *steps* (length, diameter, position) from the smoothed centre
line (see :mod:`rootflow.traits.length`), and each tip yields one *cap* step: the skeleton
stops about one radius short of a root's end, so we extend it by the radius at the tip
(capped at the frame edge). Traits are sums over steps, which makes regions of interest and
diameter classes simple filters.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from rootflow.traits.length import smooth_loop, smooth_path
from rootflow.traits.radius import chord, exit_distance, radii

TIP = 0
JUNCTION = 1
ISOLATED = 2
PASS = 3
DEAD = 4

_CAP_WIDTH_FACTOR = math.pi / 4.0  # mean width of a half-disc over its length, over 2r


@nb.njit(cache=True, nogil=True)
def analyse(sk, mask, w, h_img, w_img, pix, prune_px, half):  # pragma: no cover - compiled
    """Measure a thinned skeleton.

    Args:
        sk: padded, flattened ``uint8`` skeleton; pruned pixels are zeroed in place.
        mask: padded, flattened ``uint8`` mask (for radii).
        w: padded width. h_img, w_img: unpadded image size.
        pix: padded flat indices of the skeleton pixels.
        prune_px: spur protrusion threshold (px); <= 0 disables pruning.
        half: half-width of the smoothing window (points).

    Returns:
        ``(step_len, step_diam, step_y, step_x, step_is_cap, tip_y, tip_x, bp_y, bp_x,
        final_pix)``; lengths and diameters in px, positions in unpadded image coordinates.
    """
    n = pix.size
    rad = radii(mask, w, h_img, w_img, pix)
    idx = np.full(sk.size, -1, np.int32)
    for i in range(n):
        idx[pix[i]] = i
    offs = np.array([-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1], np.int64)
    deg = np.zeros(n, np.int32)
    for i in range(n):
        c = 0
        for o in offs:
            if idx[pix[i] + o] >= 0:
                c += 1
        deg[i] = c

    # ---- nodes: tips, junction clusters, isolated pixels
    node = np.full(n, -1, np.int32)
    kind = np.empty(n + 1, np.int8)
    stack = np.empty(n + 1, np.int64)
    nn = 0
    for i in range(n):
        if node[i] >= 0:
            continue
        if deg[i] >= 3:
            node[i] = nn
            stack[0] = i
            top = 1
            while top > 0:
                top -= 1
                j = stack[top]
                for o in offs:
                    q = idx[pix[j] + o]
                    if q >= 0 and deg[q] >= 3 and node[q] < 0:
                        node[q] = nn
                        stack[top] = q
                        top += 1
            kind[nn] = JUNCTION
            nn += 1
        elif deg[i] == 1:
            node[i] = nn
            kind[nn] = TIP
            nn += 1
        elif deg[i] == 0:
            node[i] = nn
            kind[nn] = ISOLATED
            nn += 1
    ny = np.zeros(nn)
    nx = np.zeros(nn)
    ncount = np.zeros(nn)
    nr = np.zeros(nn)
    for i in range(n):
        a = node[i]
        if a >= 0:
            y = pix[i] // w
            ny[a] += y - 1
            nx[a] += pix[i] - y * w - 1
            ncount[a] += 1.0
            if rad[i] > nr[a]:
                nr[a] = rad[i]
    for a in range(nn):
        ny[a] /= ncount[a]
        nx[a] /= ncount[a]

    # ---- branches: chains between nodes, then closed loops
    maxb = 4 * n + 4
    path = np.empty(n + 2 * maxb, np.int64)
    bptr = np.zeros(maxb + 1, np.int64)
    bstart = np.empty(maxb, np.int32)
    bend = np.empty(maxb, np.int32)
    visited = np.zeros(n, np.bool_)
    nbr = 0
    npath = 0
    for i in range(n):
        a = node[i]
        if a < 0:
            continue
        for o in offs:
            q = idx[pix[i] + o]
            if q < 0:
                continue
            b = node[q]
            if b == a:
                continue
            if b >= 0:
                if kind[a] == TIP and (kind[b] != TIP or a < b):
                    path[npath] = i
                    path[npath + 1] = q
                    npath += 2
                    bstart[nbr] = a
                    bend[nbr] = b
                    nbr += 1
                    bptr[nbr] = npath
                continue
            if visited[q]:
                continue
            first = npath
            path[npath] = i
            npath += 1
            prev = i
            cur = q
            end = -1
            while True:
                if node[cur] >= 0:
                    path[npath] = cur
                    npath += 1
                    end = node[cur]
                    break
                visited[cur] = True
                path[npath] = cur
                npath += 1
                nxt = -1
                for o2 in offs:
                    r = idx[pix[cur] + o2]
                    if r >= 0 and r != prev:
                        nxt = r
                        break
                prev = cur
                cur = nxt
            if end == a and npath - first <= 4:
                npath = first  # a tiny loop inside a junction's own neighbourhood
                continue
            bstart[nbr] = a
            bend[nbr] = end
            nbr += 1
            bptr[nbr] = npath
    for i in range(n):
        if deg[i] == 2 and node[i] < 0 and not visited[i]:
            prev = -1
            cur = i
            while cur >= 0:
                visited[cur] = True
                path[npath] = cur
                npath += 1
                nxt = -1
                for o2 in offs:
                    r = idx[pix[cur] + o2]
                    if r >= 0 and r != prev and not visited[r]:
                        nxt = r
                        break
                prev = cur
                cur = nxt
            bstart[nbr] = -1
            bend[nbr] = -1
            nbr += 1
            bptr[nbr] = npath

    blen = np.zeros(nbr)
    for b in range(nbr):
        for k in range(bptr[b], bptr[b + 1] - 1):
            p0 = pix[path[k]]
            p1 = pix[path[k + 1]]
            d = abs(p1 - p0)
            blen[b] += 1.0 if (d == 1 or d == w) else math.sqrt(2.0)

    # ---- spur pruning
    ndeg = np.zeros(nn, np.int32)
    for b in range(nbr):
        if bstart[b] >= 0:
            ndeg[bstart[b]] += 1
            ndeg[bend[b]] += 1
    knd = kind[:nn].copy()
    alive = np.ones(nbr, np.bool_)
    spur = np.zeros(nbr, np.bool_)
    nonspur = np.zeros(nn, np.int32)
    best1 = np.full(nn, -1, np.int64)
    best2 = np.full(nn, -1, np.int64)
    while prune_px > 0:
        found = False
        for b in range(nbr):
            spur[b] = False
            if not alive[b] or bstart[b] < 0:
                continue
            s = bstart[b]
            e = bend[b]
            if knd[s] == TIP and knd[e] == JUNCTION:
                t = s
                j = e
            elif knd[e] == TIP and knd[s] == JUNCTION:
                t = e
                j = s
            else:
                continue
            if blen[b] + nr[t] - nr[j] < max(prune_px, 0.5 * nr[j]):
                spur[b] = True
                found = True
        if not found:
            break
        nonspur[:] = 0
        best1[:] = -1
        best2[:] = -1
        for b in range(nbr):
            if not alive[b] or bstart[b] < 0:
                continue
            for end in (bstart[b], bend[b]):
                if not spur[b]:
                    nonspur[end] += 1
                elif knd[end] == JUNCTION:
                    if best1[end] < 0 or blen[b] > blen[best1[end]]:
                        best2[end] = best1[end]
                        best1[end] = b
                    elif best2[end] < 0 or blen[b] > blen[best2[end]]:
                        best2[end] = b
        for j in range(nn):
            if knd[j] == JUNCTION and nonspur[j] == 0:
                if best1[j] >= 0:
                    spur[best1[j]] = False
                if best2[j] >= 0:
                    spur[best2[j]] = False
        removed = False
        for b in range(nbr):
            if not spur[b]:
                continue
            removed = True
            alive[b] = False
            s = bstart[b]
            e = bend[b]
            t = s if knd[s] == TIP else e
            j = e if t == s else s
            knd[t] = DEAD
            ndeg[t] -= 1
            ndeg[j] -= 1
            keep_first = j == s
            for k in range(bptr[b], bptr[b + 1]):
                if (k == bptr[b] and keep_first) or (k == bptr[b + 1] - 1 and not keep_first):
                    continue
                sk[pix[path[k]]] = 0
        if not removed:
            break
        for j in range(nn):
            if knd[j] == JUNCTION:
                if ndeg[j] == 1:
                    knd[j] = TIP
                elif ndeg[j] == 2:
                    knd[j] = PASS

    # ---- steps along branches
    maxsteps = npath + 2 * nn + 8
    st_len = np.empty(maxsteps)
    st_d = np.empty(maxsteps)
    st_y = np.empty(maxsteps, np.int64)
    st_x = np.empty(maxsteps, np.int64)
    st_cap = np.zeros(maxsteps, np.bool_)
    ys = np.empty(n + 2)
    xs = np.empty(n + 2)
    rr = np.empty(n + 2)
    sy = np.empty(n + 2)
    sx = np.empty(n + 2)
    cw = np.empty(n + 2)
    ext = np.full(nn, -1.0)
    cws = np.empty(n + 2)
    ns = 0
    for b in range(nbr):
        if not alive[b]:
            continue
        a0 = bptr[b]
        m = bptr[b + 1] - a0
        for k in range(m):
            i = path[a0 + k]
            y = pix[i] // w
            ys[k] = y - 1
            xs[k] = pix[i] - y * w - 1
            rr[k] = rad[i]
        if bstart[b] >= 0:
            s = bstart[b]
            e = bend[b]
            if kind[s] == JUNCTION:
                ys[0] = ny[s]
                xs[0] = nx[s]
            if kind[e] == JUNCTION:
                ys[m - 1] = ny[e]
                xs[m - 1] = nx[e]
            smooth_path(ys[:m], xs[:m], half, sy, sx)
            last = m - 1
            # how far the root goes on beyond each tip, along the branch's end direction
            for end_node, k0, k1 in ((s, 0, min(half, m - 1)), (e, m - 1, max(m - 1 - half, 0))):
                if knd[end_node] == TIP and k0 != k1:
                    ext[end_node] = exit_distance(mask, w, h_img, w_img, ys[k0], xs[k0],
                                                  sy[k0] - sy[k1], sx[k0] - sx[k1])
        else:
            smooth_loop(ys[:m], xs[:m], half, sy, sx)
            last = m
        for k in range(m):
            if bstart[b] >= 0:
                ka = max(k - 1, 0)
                kb = min(k + 1, m - 1)
            else:
                ka = (k - 1) % m
                kb = (k + 1) % m
            cw[k] = chord(mask, w, h_img, w_img, ys[k], xs[k], sy[kb] - sy[ka], sx[kb] - sx[ka],
                          2.0 * rr[k])
        if bstart[b] >= 0:
            smooth_path(cw[:m], cw[:m], half, cws, cws)
        else:
            smooth_loop(cw[:m], cw[:m], half, cws, cws)
        for k in range(last):
            k1 = (k + 1) % m
            st_len[ns] = math.hypot(sy[k1] - sy[k], sx[k1] - sx[k])
            st_d[ns] = 0.5 * (cws[k] + cws[k1])
            st_y[ns] = int(math.floor(0.5 * (ys[k] + ys[k1]) + 0.5))
            st_x[ns] = int(math.floor(0.5 * (xs[k] + xs[k1]) + 0.5))
            ns += 1

    # ---- tips (with caps) and branch points
    ntip = 0
    for a in range(nn):
        if knd[a] == TIP:
            ntip += 1
        elif knd[a] == ISOLATED:
            ntip += 2
    tip_y = np.empty(ntip)
    tip_x = np.empty(ntip)
    ti = 0
    for a in range(nn):
        reps = 1 if knd[a] == TIP else (2 if knd[a] == ISOLATED else 0)
        for _ in range(reps):
            edge = min(ny[a] + 0.5, nx[a] + 0.5, h_img - 0.5 - ny[a], w_img - 0.5 - nx[a])
            st_len[ns] = ext[a] if ext[a] >= 0 else min(nr[a], edge)
            # a cap cut by the frame edge is full width; a free tip tapers like a half disc
            st_d[ns] = 2.0 * nr[a] * (1.0 if edge < nr[a] else _CAP_WIDTH_FACTOR)
            st_y[ns] = int(math.floor(ny[a] + 0.5))
            st_x[ns] = int(math.floor(nx[a] + 0.5))
            st_cap[ns] = True
            ns += 1
            tip_y[ti] = ny[a]
            tip_x[ti] = nx[a]
            ti += 1

    parent = np.arange(nn)
    for b in range(nbr):
        if not alive[b] or bstart[b] < 0:
            continue
        s = bstart[b]
        e = bend[b]
        if s != e and knd[s] == JUNCTION and knd[e] == JUNCTION and blen[b] < max(nr[s], nr[e]):
            rs = s
            while parent[rs] != rs:
                rs = parent[rs]
            re = e
            while parent[re] != re:
                re = parent[re]
            if rs != re:
                parent[max(rs, re)] = min(rs, re)
    nbp = 0
    for a in range(nn):
        if knd[a] == JUNCTION and parent[a] == a:
            nbp += 1
    bp_y = np.empty(nbp)
    bp_x = np.empty(nbp)
    bi = 0
    for a in range(nn):
        if knd[a] == JUNCTION and parent[a] == a:
            bp_y[bi] = ny[a]
            bp_x[bi] = nx[a]
            bi += 1

    nf = 0
    final = np.empty(n, np.int64)
    for i in range(n):
        if sk[pix[i]] != 0:
            final[nf] = pix[i]
            nf += 1
    return (st_len[:ns], st_d[:ns], st_y[:ns], st_x[:ns], st_cap[:ns], tip_y, tip_x,
            bp_y, bp_x, final[:nf])
