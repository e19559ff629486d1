/* The planner's two sequential loops: drawing documents by smooth weighted round-robin, and
 * best-fit packing. Each has a Python twin in `slipstream/data/plankernels.py` with the same
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
