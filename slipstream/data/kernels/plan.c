/* The planner's sequential loops: drawing documents by smooth weighted round-robin, best-fit
 * packing, and balancing rows over ranks (largest differencing, then swap refinement). Each has
 * a Python twin (in `slipstream/data/plankernels.py` and `balance.py`) in `slipstream/data/plankernels.py` with the same
 * results bit for bit (plain IEEE double adds and multiplies, built with -ffp-contract=off and
 * without -ffast-math or -march, so every machine of a job computes the same plan). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Draw documents until `budget` units are used, or until an open source has no document left
 * in its lookahead (checked before each draw, so the stop changes nothing). A unit is a token
 * when packing, else a row: ceil(len / seq_len), at least 1.
 *
 * credits[n]: in/out. weights[n]. open[n]: nonzero where the weight is above zero.
 * ahead_len: the lengths of each source's next documents, source s at
 * [ahead_off[s], ahead_off[s + 1]); ahead_pos[s] (in/out): how many of those are used.
 * out_flat[i]: the index into ahead_len of draw i. *used (in/out): units used so far.
 * *short_src: the open source that ran out of lookahead, else -1. Returns the draws made. */
int64_t draw_docs(double *credits, const double *weights, const uint8_t *open, int64_t n,
                  const int64_t *ahead_len, const int64_t *ahead_off, int64_t *ahead_pos,
                  int by_tokens, int packing, int64_t seq_len, int64_t budget,
                  int64_t *out_flat, int64_t *used, int64_t *short_src) {
    int64_t made = 0;
    *short_src = -1;
    double *mask = malloc((n > 0 ? n : 1) * sizeof(double)); /* 0 if open, else -inf */
    if (!mask)
        return -1;
    for (int64_t i = 0; i < n; i++) {
        mask[i] = open[i] ? 0.0 : -__builtin_inf();
        if (open[i] && ahead_pos[i] == ahead_off[i + 1] - ahead_off[i])
            *short_src = i;
    }
    while (*used < budget && *short_src < 0) {
        /* Documents: every source earns its weight before the draw (one document is the
         * unit). Tokens: credit follows once the drawn document's length is known. The
         * source with the most credit among the open ones is drawn, the first on a tie. */
        int64_t best = 0;
        double top = -__builtin_inf();
        for (int64_t i = 0; i < n; i++) {
            double c = by_tokens ? credits[i] : (credits[i] += weights[i]);
            c += mask[i];
            if (c > top) {
                best = i;
                top = c;
            }
        }
        int64_t flat = ahead_off[best] + ahead_pos[best]++;
        if (ahead_pos[best] == ahead_off[best + 1] - ahead_off[best])
            *short_src = best;
        int64_t len = ahead_len[flat];
        if (by_tokens) {
            double amount = (double)len;
            for (int64_t i = 0; i < n; i++)
                credits[i] += weights[i] * amount;
            credits[best] -= amount;
        } else {
            credits[best] -= 1.0;
        }
        out_flat[made++] = flat;
        if (packing) {
            *used += len;
        } else {
            int64_t rows = (len + seq_len - 1) / seq_len;
            *used += rows > 0 ? rows : 1;
        }
    }
    free(mask);
    return made;
}

/* Best fit of `n` chunks (each at most seq_len tokens, longest first) into `num_rows` rows of
 * `seq_len`: a chunk goes whole into the row with the least free space that holds it; one that
 * fits nowhere fills the row with the most free space and carries on. Among rows with equal free
 * space the one that reached it last is taken (a stack per free-space value; at the start rows
 * are taken in order 0, 1, ...).
 *
 * Writes one part per placement: part_chunk (which chunk), part_off (offset in the chunk),
 * part_len, part_row. Returns the number of parts, or -1 if the chunks overflow the rows. */
int64_t pack_best_fit(const int64_t *chunk_len, int64_t n, int64_t num_rows, int64_t seq_len,
                      int64_t *part_chunk, int64_t *part_off, int64_t *part_len,
                      int64_t *part_row) {
    int64_t words = seq_len / 64 + 1;
    int64_t *head = malloc((seq_len + 1) * sizeof(int64_t));
    int64_t *next = malloc((num_rows > 0 ? num_rows : 1) * sizeof(int64_t));
    uint64_t *bits = calloc(words, sizeof(uint64_t)); /* bit v: some row has v tokens free */
    int64_t parts = 0;
    if (!head || !next || !bits) {
        parts = -2;
        goto done;
    }
    for (int64_t v = 0; v <= seq_len; v++)
        head[v] = -1;
    for (int64_t r = num_rows - 1; r >= 0; r--) {
        next[r] = head[seq_len];
        head[seq_len] = r;
    }
    if (num_rows > 0)
        bits[seq_len / 64] |= 1ull << (seq_len % 64);
    for (int64_t c = 0; c < n; c++) {
        int64_t left = chunk_len[c], off = 0;
        while (left > 0) {
            /* the least free space >= left, else the most */
            int64_t v = -1, w = left / 64;
            uint64_t m = bits[w] & (~0ull << (left % 64));
            for (;;) {
                if (m) {
                    v = w * 64 + __builtin_ctzll(m);
                    break;
                }
                if (++w == words)
                    break;
                m = bits[w];
            }
            if (v < 0) {
                for (w = (left - 1) / 64; w >= 0 && v < 0; w--)
                    if (bits[w])
                        v = w * 64 + 63 - __builtin_clzll(bits[w]);
                if (v <= 0) {
                    parts = -1;
                    goto done;
                }
            }
            int64_t r = head[v];
            head[v] = next[r];
            if (head[v] < 0)
                bits[v / 64] &= ~(1ull << (v % 64));
            int64_t take = v < left ? v : left;
            part_chunk[parts] = c;
            part_off[parts] = off;
            part_len[parts] = take;
            part_row[parts++] = r;
            int64_t room = v - take;
            if (room > 0) {
                next[r] = head[room];
                head[room] = r;
                bits[room / 64] |= 1ull << (room % 64);
            }
            left -= take;
            off += take;
        }
    }
done:
    free(head);
    free(next);
    free(bits);
    return parts;
}

typedef struct {
    double key;
    int64_t idx;
} keyed;

static int by_key_asc(const void *x, const void *y) {
    const keyed *a = x, *b = y;
    if (a->key != b->key)
        return a->key < b->key ? -1 : 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

static int by_key_desc(const void *x, const void *y) {
    const keyed *a = x, *b = y;
    if (a->key != b->key)
        return a->key > b->key ? -1 : 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

static int int64_asc(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* idx[0..n) = the order of key, ascending (descending if desc), equal keys by index: numpy's
 * argsort(kind="stable") of key (of -key when desc). The ties are broken by index, so the
 * order is total and qsort's instability does not show. tmp: n entries of scratch. */
static void argsort_stable(const double *key, int64_t *idx, int64_t n, int desc, keyed *tmp) {
    for (int64_t i = 0; i < n; i++) {
        tmp[i].key = key[i];
        tmp[i].idx = i;
    }
    qsort(tmp, n, sizeof(keyed), desc ? by_key_desc : by_key_asc);
    for (int64_t i = 0; i < n; i++)
        idx[i] = tmp[i].idx;
}

/* Largest differencing (Karmarkar-Karp), k-way with equal part sizes, one batch row at a time;
 * see balance._karmarkar_karp, its twin. costs[batch][n], n = parts * size. Items, largest
 * first, are cut into `size` partial solutions of one item per part (slots in falling load
 * order); the two with the largest spread (the older on a tie) merge, heaviest slot of one with
 * the lightest of the other. Each (solution, slot) keeps its items as a linked list.
 * out[batch][parts][size]: items of each slot, ascending. Returns 0, or -2 out of memory. */
int64_t kk_partition(const double *costs, int64_t batch, int64_t parts, int64_t size,
                     int64_t *out) {
    int64_t n = parts * size;
    int64_t *order = malloc(n * sizeof(int64_t)), *next = malloc(n * sizeof(int64_t));
    int64_t *head = malloc(n * sizeof(int64_t)), *tail = malloc(n * sizeof(int64_t));
    int64_t *age = malloc(size * sizeof(int64_t)), *perm = malloc(parts * sizeof(int64_t));
    int64_t *nh = malloc(parts * sizeof(int64_t)), *nt = malloc(parts * sizeof(int64_t));
    double *loads = malloc(n * sizeof(double)), *merged = malloc(parts * sizeof(double));
    double *neg = malloc(n * sizeof(double));
    uint8_t *alive = malloc(size);
    keyed *tmp = malloc(n * sizeof(keyed));
    int64_t rc = 0;
    if (!order || !next || !head || !tail || !age || !perm || !nh || !nt || !loads || !merged ||
        !neg || !alive || !tmp) {
        rc = -2;
        goto done;
    }
    for (int64_t b = 0; b < batch; b++) {
        const double *c = costs + b * n;
        argsort_stable(c, order, n, 1, tmp);
        for (int64_t t = 0; t < size; t++) {
            for (int64_t j = 0; j < parts; j++) {
                int64_t item = order[t * parts + j];
                head[t * parts + j] = tail[t * parts + j] = item;
                next[item] = -1;
                loads[t * parts + j] = c[item];
            }
            age[t] = t;
            alive[t] = 1;
        }
        for (int64_t t = 0; t < size - 1; t++) {
            int64_t a = -1, bb = -1; /* the largest spread, then the next; older on a tie */
            for (int64_t s = 0; s < size; s++) {
                if (!alive[s])
                    continue;
                double sp = loads[s * parts] - loads[s * parts + parts - 1];
                if (a < 0) {
                    a = s;
                    continue;
                }
                double spa = loads[a * parts] - loads[a * parts + parts - 1];
                if (sp > spa || (sp == spa && age[s] < age[a])) {
                    bb = a;
                    a = s;
                    continue;
                }
                if (bb < 0) {
                    bb = s;
                    continue;
                }
                double spb = loads[bb * parts] - loads[bb * parts + parts - 1];
                if (sp > spb || (sp == spb && age[s] < age[bb]))
                    bb = s;
            }
            double *la = loads + a * parts, *lb = loads + bb * parts;
            for (int64_t j = 0; j < parts; j++)
                merged[j] = la[j] + lb[parts - 1 - j];
            argsort_stable(merged, perm, parts, 1, tmp);
            for (int64_t q = 0; q < parts; q++) { /* new slot q: a's slot perm[q] + b's mirror */
                int64_t j = perm[q], ja = a * parts + j, jb = bb * parts + parts - 1 - j;
                nh[q] = head[ja];
                next[tail[ja]] = head[jb];
                nt[q] = tail[jb];
            }
            for (int64_t q = 0; q < parts; q++) {
                head[a * parts + q] = nh[q];
                tail[a * parts + q] = nt[q];
                neg[q] = merged[perm[q]];
            }
            memcpy(la, neg, parts * sizeof(double));
            alive[bb] = 0;
            age[a] = size + t;
        }
        int64_t last = 0;
        while (!alive[last])
            last++;
        for (int64_t q = 0; q < parts; q++) {
            int64_t *o = out + (b * parts + q) * size, m = 0;
            for (int64_t item = head[last * parts + q]; item >= 0; item = next[item])
                o[m++] = item;
            qsort(o, m, sizeof(int64_t), int64_asc);
        }
    }
done:
    free(order), free(next), free(head), free(tail), free(age), free(perm), free(nh), free(nt);
    free(loads), free(merged), free(neg), free(alive), free(tmp);
    return rc;
}

/* Swap refinement, one batch row at a time; see balance._refine, its twin. parts[batch][np][k]
 * (in/out): while a row is active, swap one item of its heaviest part (the first on a tie) with
 * one of the lightest part (stable order) that has a swap moving d, min_gain <= d < gap, the
 * pair whose d is closest to gap / 2 (the first in (i, j) order); a row stops when no part has
 * one, or after np swaps in a row that do not lower its maximum by min_gain, or after `swaps`.
 * min_gain = min_gain_frac * (mean load); loads are summed in index order. Then each part is
 * sorted ascending. Returns 0, or -2 out of memory. */
int64_t refine_parts(const double *costs, int64_t batch, int64_t n, int64_t np_, int64_t k,
                     int64_t *parts, int64_t swaps, double min_gain_frac) {
    double *loads = malloc(np_ * sizeof(double));
    int64_t *ord = malloc(np_ * sizeof(int64_t));
    uint8_t *can = malloc(np_);
    keyed *tmp = malloc(np_ * sizeof(keyed));
    int64_t rc = 0;
    if (!loads || !ord || !can || !tmp) {
        rc = -2;
        goto done;
    }
    for (int64_t b = 0; b < batch && np_ >= 2; b++) {
        const double *c = costs + b * n;
        int64_t *pp = parts + b * np_ * k;
        double total = 0.0;
        for (int64_t p = 0; p < np_; p++) {
            double s = c[pp[p * k]];
            for (int64_t j = 1; j < k; j++)
                s += c[pp[p * k + j]];
            loads[p] = s;
            total = p ? total + s : s;
        }
        double min_gain = min_gain_frac * (total / (double)np_);
        double lowest = loads[0];
        for (int64_t p = 1; p < np_; p++)
            if (loads[p] > lowest)
                lowest = loads[p];
        int64_t stalled = 0;
        for (int64_t it = 0; it < swaps; it++) {
            int64_t hi = 0;
            for (int64_t p = 1; p < np_; p++)
                if (loads[p] > loads[hi])
                    hi = p;
            const int64_t *own = pp + hi * k;
            for (int64_t p = 0; p < np_; p++) {
                double gap = loads[hi] - loads[p];
                can[p] = 0;
                if (p == hi || !(gap > 0))
                    continue;
                for (int64_t i = 0; i < k && !can[p]; i++)
                    for (int64_t j = 0; j < k; j++) {
                        double d = c[own[i]] - c[pp[p * k + j]];
                        if (d >= min_gain && d < gap) {
                            can[p] = 1;
                            break;
                        }
                    }
            }
            argsort_stable(loads, ord, np_, 0, tmp);
            int64_t lo = -1;
            for (int64_t q = 0; q < np_ && lo < 0; q++)
                if (can[ord[q]])
                    lo = ord[q];
            if (lo < 0)
                break;
            double gap = loads[hi] - loads[lo], half = gap / 2, best = 0.0, delta = 0.0;
            int64_t bi = -1, bj = -1;
            for (int64_t i = 0; i < k; i++)
                for (int64_t j = 0; j < k; j++) {
                    double d = c[own[i]] - c[pp[lo * k + j]];
                    if (!(d >= min_gain && d < gap))
                        continue;
                    double v = d - half;
                    v = v < 0 ? -v : v;
                    if (bi < 0 || v < best) {
                        best = v, bi = i, bj = j, delta = d;
                    }
                }
            int64_t x = pp[hi * k + bi];
            pp[hi * k + bi] = pp[lo * k + bj];
            pp[lo * k + bj] = x;
            loads[hi] -= delta;
            loads[lo] += delta;
            double top = loads[0];
            for (int64_t p = 1; p < np_; p++)
                if (loads[p] > top)
                    top = loads[p];
            if (top <= lowest - min_gain) {
                lowest = top;
                stalled = 0;
            } else if (++stalled >= np_) {
                break;
            }
        }
    }
    for (int64_t b = 0; b < batch; b++) /* each part ascending */
        for (int64_t p = 0; p < np_; p++)
            qsort(parts + (b * np_ + p) * k, k, sizeof(int64_t), int64_asc);
done:
    free(loads), free(ord), free(can), free(tmp);
    return rc;
}
