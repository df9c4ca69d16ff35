// Causal attention in the FlashAttention-2 manner (Dao 2023) for training: grouped-query heads,
// packed-sequence (segment) masks, forward and backward, on tensor cores (mma.sync m16n8k16,
// bf16 or f16 in, f32 accumulate). No S × S matrix exists: the forward keeps its tiles of
// scores in registers with an online softmax and saves each row's log-sum-exp; the
// backward rebuilds the probabilities tile by tile from it. The CPU reference is
// kernels/src/flash_attention.rs; the launchers are kernels/src/flash_cuda.rs.
//
// Tensors are [batch, heads, rows, head_dim] with any strides whose last dimension is 1 and
// whose rows start 16-byte aligned (the launcher checks), so q, k, v and the output can be
// views of the projections' [batch, rows, heads · head_dim] layout. Segments are [batch, rows]
// u32: query i sees key j when j <= i and both share a segment (padding has one of its own).
//
// Each block has four warps; a warp owns 16 rows of a 64-row tile (32 rows of a 128-row tile in
// the wide forward, flash_forward_wide_*). Fragments follow the PTX
// layouts of mma.m16n8k16: lane = 4 · g + t holds accumulator rows g and g + 8, columns 2t and
// 2t + 1 of each 8-column tile, which is also its A-operand layout, so a tile of scores turns
// into the next matmul's operand in registers.
//
// Tiles arrive by cp.async (async_copy.cuh) one step ahead of the matmuls that read them: the
// forward loads the next keys during this tile's softmax and P v, and the next values during
// the next q kᵀ; each backward kernel keeps two buffers of the tile it reads first and last
// (keys for dq, queries for dk / dv) and loads the next of the other (values, dO) once its
// last matmul on it is done. cp.async groups complete in order: a thread's wait<N> says how
// many of its latest groups may still be in flight, and every loop commits the same groups
// (some empty) each iteration, so the counts hold.
#include "async_copy.cuh"
#include "common.cuh"
#include "tensor_core.cuh"

// Element strides of a [batch, heads, rows, head_dim] tensor (head_dim's stride is 1); passed by
// value, as the launcher's #[repr(C)] struct of three i64.
struct Strides {
  int64_t b, h, s;
};

namespace {

constexpr int kTile = 64;       // query rows per tile and keys per tile
constexpr int kThreads = 128;   // four warps of 16 rows
constexpr float kLog2e = 1.4426950408889634f;

// Rows of a shared-memory tile are padded by 8 elements (16 bytes): the 8 rows one ldmatrix
// phase reads then start in 8 different groups of 4 banks.
template <int D> __host__ __device__ constexpr int pitch() { return D + 8; }

// Where this lane points ldmatrix for a 16 × 16 block at (row0, col0) of a row-major tile whose
// four 8 × 8 quarters are wanted in the order (top left, bottom left, top right, bottom right):
// an A operand (rows = M, columns = K), or with .trans a pair of B operands from a [K][N] tile
// (registers 0, 1 for columns col0..+8 and 2, 3 for col0 + 8..+16).
template <typename T, int D>
__device__ __forceinline__ const T *quarters_down_first(const T *tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  return tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch<D>() + col0 + (lane >> 4) * 8;
}

// The same for a pair of B operands from an [N][K] tile (B = the tile transposed, as for
// q kᵀ): quarters in the order (top left, top right, bottom left, bottom right), registers 0, 1
// for rows row0..+8 (N) and 2, 3 for row0 + 8..+16.
template <typename T, int D>
__device__ __forceinline__ const T *quarters_across_first(const T *tile, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  return tile + (row0 + (lane & 7) + (lane >> 4) * 8) * pitch<D>() + col0 + ((lane >> 3) & 1) * 8;
}

// Two values rounded to T and packed into one register, the first in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// The A fragment of a 16 × 16 block from its two 16 × 8 accumulator tiles (columns 0–7 in c0,
// 8–15 in c1): the layouts agree, so this is rounding and packing only.
template <typename T>
__device__ __forceinline__ void as_operand(uint32_t (&a)[4], const float (&c0)[4],
                                           const float (&c1)[4]) {
  a[0] = pack<T>(c0[0], c0[1]);
  a[1] = pack<T>(c0[2], c0[3]);
  a[2] = pack<T>(c1[0], c1[1]);
  a[3] = pack<T>(c1[2], c1[3]);
}

// A warp's accumulator tiles for one block of 16 rows, seen as the first of a warp's row
// blocks (the forward's warps may own two; the backward's own one).
template <typename F, int N>
__device__ __forceinline__ auto one_block(F (&acc)[N][4]) -> F (&)[1][N][4] {
  return *reinterpret_cast<F(*)[1][N][4]>(&acc);
}

// acc[mb][n] (+)= A[mb] · Bᵀ over one 16-column slice kk of the head dimension, for MB row
// blocks: A[mb] = a warp's 16 × 16 fragment of that slice, B = the same slice of the NK rows
// of the [NK][D] tile `b`. Each B fragment is read from shared memory once for all MB blocks.
template <typename T, int D, int MB, int NK = kTile>
__device__ __forceinline__ void fragments_times_tile_t(float (&acc)[MB][NK / 8][4],
                                                       const uint32_t (&af)[MB][4], const T *b,
                                                       int kk) {
#pragma unroll
  for (int n = 0; n < NK / 16; ++n) {
    uint32_t bf[4];
    ldmatrix_x4(bf, quarters_across_first<T, D>(b, n * 16, kk * 16));
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      mma<T>(acc[mb][2 * n], af[mb], bf[0], bf[1]);
      mma<T>(acc[mb][2 * n + 1], af[mb], bf[2], bf[3]);
    }
  }
}

// acc[n] (+)= A · Bᵀ over the whole head dimension, for A = 16 rows at a_row of tile `a` and
// B = the 64 rows of tile `b` (both [64][D]): a warp's 16 × 64 block of q kᵀ.
template <typename T, int D>
__device__ __forceinline__ void rows_times_tile_t(float (&acc)[kTile / 8][4], const T *a,
                                                  int a_row, const T *b) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[1][4];
    ldmatrix_x4(af[0], quarters_down_first<T, D>(a, a_row, kk * 16));
    fragments_times_tile_t<T, D, 1>(one_block(acc), af, b, kk);
  }
}

// acc[mb] (+)= P[mb] · B for MB of a warp's 16 × NK blocks P (accumulator tiles, rounded to
// T here) and an [NK][D] tile B: 16 × D results of probabilities (or score gradients) times
// values. Each B fragment is read from shared memory once for all MB blocks.
template <typename T, int D, int MB, int NK = kTile>
__device__ __forceinline__ void blocks_times_tile(float (&acc)[MB][D / 8][4],
                                                  const float (&p)[MB][NK / 8][4],
                                                  const T *b) {
#pragma unroll
  for (int kk = 0; kk < NK / 16; ++kk) {
    uint32_t pf[MB][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) as_operand<T>(pf[mb], p[mb][2 * kk], p[mb][2 * kk + 1]);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, quarters_down_first<T, D>(b, kk * 16, n * 16));
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        mma<T>(acc[mb][2 * n], pf[mb], bf[0], bf[1]);
        mma<T>(acc[mb][2 * n + 1], pf[mb], bf[2], bf[3]);
      }
    }
  }
}

// The same for one block: acc (+)= P · B.
template <typename T, int D>
__device__ __forceinline__ void block_times_tile(float (&acc)[D / 8][4],
                                                 const float (&p)[kTile / 8][4], const T *b) {
  blocks_times_tile<T, D, 1>(one_block(acc), one_block(p), b);
}

// Starts loading rows [row0, row0 + 64) of one head (`head` points at its row 0) into a
// [64][pitch] tile; rows at or past `rows` become zeros. 16-byte copies, in flight until this
// thread's cp_async_wait.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T *tile, const T *head, int64_t row_stride, int row0,
                                          int rows) {
  constexpr int kPerRow = D / 8;
  for (int i = threadIdx.x; i < kTile * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * 8;
    const bool in = row0 + r < rows;
    cp_async_16(tile + r * pitch<D>() + c, head + (in ? (int64_t)(row0 + r) * row_stride + c : 0),
                in);
  }
}

// Starts loading 64 four-byte values from `from` (row0 onwards) into `to`; those at or past
// `rows` become zeros.
template <typename V>
__device__ __forceinline__ void load_row_values(V *to, const V *from, int row0, int rows) {
  if (threadIdx.x < kTile) {
    const int i = row0 + threadIdx.x;
    cp_async_4(to + threadIdx.x, from + (i < rows ? i : 0), i < rows);
  }
}

// A warp's 16 × D accumulator rows (rows this lane holds: row[0], row[1]) to memory, each
// multiplied by scale[r]; rows at or past `rows` are not written.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T *head, int64_t row_stride, const int (&row)[2],
                                           int rows, const float (&acc)[D / 8][4],
                                           const float (&scale)[2]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= rows) continue;
    T *out = head + (int64_t)row[r] * row_stride + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t *>(out + n * 8) =
          pack<T>(acc[n][2 * r] * scale[r], acc[n][2 * r + 1] * scale[r]);
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Column c (0..63) of accumulator element e of 8-column tile n, for this lane.
__device__ __forceinline__ int column(int n, int e) { return n * 8 + 2 * (threadIdx.x % 4) + (e & 1); }

// The online softmax's step for a warp's 16 rows over NK more keys: s holds their masked
// scores in base 2 (masked ones -inf) and part_max each lane's row maxima of them. The new row
// maxima rescale the running sums l and output rows o, and s becomes exp2(s − max), added to l.
template <int D, int NK>
__device__ __forceinline__ void online_softmax_step(float (&s)[NK / 8][4],
                                                    const float (&part_max)[2], float (&m)[2],
                                                    float (&l)[2], float (&o)[D / 8][4]) {
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m[r], quad_max(part_max[r]));
    // A row that has seen nothing yet keeps zeros (exp2(-inf - 0) = 0), never NaN.
    base[r] = m_new == -INFINITY ? 0.0f : m_new;
    const float rescale = exp2f(m[r] - base[r]);
    m[r] = m_new;
    l[r] *= rescale;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][2 * r] *= rescale;
      o[n][2 * r + 1] *= rescale;
    }
  }
#pragma unroll
  for (int n = 0; n < NK / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[n][e] = exp2f(s[n][e] - base[e >> 1]);
      l[e >> 1] += s[n][e];
    }
}

// With `ordered` (every row's segment ids non-decreasing: packed documents in order, padding
// last), a key tile whose last id is below a query tile's first id holds only earlier
// documents: no query of the tile sees any of its keys. The test reads the same two ids in
// every thread, so every thread skips the same tiles.
__device__ __forceinline__ bool earlier_documents(const uint32_t *segb, int ordered, int k0,
                                                  int q0, int S) {
  return ordered && segb[min(k0 + kTile, S) - 1] < segb[q0];
}

// The first key tile the query tile at q0 sees: the key tiles of earlier documents only are a
// prefix (ids non-decreasing), and the query tile's own is never among them (the bound keeps
// that so even for ids the launcher wrongly called ordered).
__device__ __forceinline__ int first_key_tile(const uint32_t *segb, int ordered, int q0, int S) {
  int k0 = 0;
  while (k0 < q0 && earlier_documents(segb, ordered, k0, q0, S)) k0 += kTile;
  return k0;
}

// How many query tiles from k0 on see the key tile at k0: its own, then those up to the first
// of later documents only (a suffix).
__device__ __forceinline__ int query_tiles_seeing(const uint32_t *segb, int ordered, int k0,
                                                  int S) {
  int n = 1;
  for (int q0 = k0 + kTile; q0 < S && !earlier_documents(segb, ordered, k0, q0, S); q0 += kTile)
    ++n;
  return n;
}

// Forward: a block per (64 · MB query rows, batch · query head); the last tiles (most keys)
// first. A warp owns MB blocks of 16 rows. With MB = 1 its q fragments stay in registers; with
// MB = 2 q stays in shared memory and each k and v fragment a warp reads from shared memory
// feeds both of its row blocks' matmuls; q is read again for each half tile, so per 32 rows a
// key tile costs 12 · D/16 ldmatrix.x4 (q 4, k 4, v 4) against the 16 · D/16 of two 16-row
// warps: a quarter fewer shared-memory reads per FLOP, for twice the accumulators and half the
// blocks. out [B, Hq, S, D] by `os`; lse [B, Hq, S] f32 (natural log of Σ exp(score · scale)).
// Shared memory (dynamic; FlashKernel::Forward, ForwardWide): the k and v tiles (q passes
// through k's when MB = 1), MB = 2: q's 128 rows, then two tiles' key ids and the block's
// query ids.
template <typename T, int D, int MB>
__device__ void forward(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                        const uint32_t *__restrict__ seg, int ordered, T *__restrict__ out,
                        float *__restrict__ lse, int S, int Hq, int Hkv, float scale, Strides qs,
                        Strides ks, Strides vs, Strides os) {
  constexpr int kRows = kTile * MB;  // query rows per block
  // A key tile is worked in kParts parts of kKeys keys (scores, softmax, P v): with MB = 2,
  // halves, so a part's scores take 32 registers, not 64.
  constexpr int kParts = MB, kKeys = kTile / kParts;
  constexpr int kTiles = MB == 1 ? 2 : 2 + MB;
  unsigned char *smem = dynamic_shared_memory();
  T *sk = reinterpret_cast<T *>(smem);
  T *sv = sk + kTile * pitch<D>(), *sq = sv + kTile * pitch<D>();
  // Two tiles' key ids [2][kTile], then the block's query ids [kRows].
  uint32_t *sseg = reinterpret_cast<uint32_t *>(sk + kTiles * kTile * pitch<D>());
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
  const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
  const int warp_row = warp * 16 * MB;  // the warp's first row within the block
  const uint32_t *segb = seg + (int64_t)b * S;
  // Rows this lane holds: r = 0, 1 of each row block (accumulator rows g and g + 8).
  const auto row_of = [&](int mb, int r) { return q0 + warp_row + mb * 16 + g + 8 * r; };
  // The query rows' segment ids, kept in shared memory rather than registers.
  uint32_t *qseg = sseg + 2 * kTile;
  for (int i = threadIdx.x; i < kRows; i += kThreads) qseg[i] = q0 + i < S ? segb[q0 + i] : 0;
  const float scale2 = scale * kLog2e;  // scores in base 2: exp2 is one instruction
  const T *qh = q + b * qs.b + h * qs.h;

  // MB = 1: the warp's 16 query rows as A fragments in registers, through the key tile's buffer.
  uint32_t qf[MB == 1 ? D / 16 : 1][4];
  if constexpr (MB == 1) {
    load_tile<T, D>(sk, qh, qs.s, q0, S);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldmatrix_x4(qf[kk], quarters_down_first<T, D>(sk, warp_row, kk * 16));
    __syncthreads();
  } else {
#pragma unroll
    for (int t = 0; t < MB; ++t)  // in the first keys' group
      load_tile<T, D>(sq + t * kTile * pitch<D>(), qh, qs.s, q0 + t * kTile, S);
  }

  float o[MB][D / 8][4];
  float m[MB][2], l[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mb][n][0] = o[mb][n][1] = o[mb][n][2] = o[mb][n][3] = 0.0f;
    m[mb][0] = m[mb][1] = -INFINITY;
    l[mb][0] = l[mb][1] = 0.0f;
  }
  const T *kh = k + b * ks.b + kvh * ks.h, *vh = v + b * vs.b + kvh * vs.h;
  const int keys = min(S, q0 + kRows);  // causal: none past the block's last row
  const int first = first_key_tile(segb, ordered, q0, S);
  // The first tile's keys (with their ids) and values, as two groups.
  load_tile<T, D>(sk, kh, ks.s, first, S);
  load_row_values(sseg, segb, first, S);
  cp_async_commit();
  load_tile<T, D>(sv, vh, vs.s, first, S);
  cp_async_commit();
  for (int k0 = first, buf = 0; k0 < keys; k0 += kTile, buf ^= 1) {
    const int next = k0 + kTile;  // a tile to load when below `keys`
    const uint32_t *tseg = sseg + buf * kTile;
    cp_async_wait<1>();  // this tile's keys (and q); its values may be in flight
    __syncthreads();
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const int j0 = k0 + part * kKeys;  // the part's first key
      // Whether any of the warp's rows sees a key of this part (the same in the whole warp;
      // with MB = 1 always): a warp wholly above the causal diagonal skips the part's work.
      const bool sees = q0 + warp_row + 16 * MB - 1 >= j0;
      float s[MB][kKeys / 8][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n)
          s[mb][n][0] = s[mb][n][1] = s[mb][n][2] = s[mb][n][3] = 0.0f;
      if (sees) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t af[MB][4];
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            if constexpr (MB == 1) {
#pragma unroll
              for (int i = 0; i < 4; ++i) af[mb][i] = qf[kk][i];
            } else {
              ldmatrix_x4(af[mb], quarters_down_first<T, D>(sq, warp_row + mb * 16, kk * 16));
            }
          }
          fragments_times_tile_t<T, D, MB, kKeys>(s, af, sk + part * kKeys * pitch<D>(), kk);
        }
      }
      if (part == kParts - 1) {
        __syncthreads();  // every warp has read the keys: the next ones may come in
        if (next < keys) {
          load_tile<T, D>(sk, kh, ks.s, next, S);
          load_row_values(sseg + (buf ^ 1) * kTile, segb, next, S);
        }
        cp_async_commit();
      }

      if (sees) {
        // Mask, scale, and the online softmax: the new row maximum rescales what came before.
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          float part_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
          for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = e >> 1, i = row_of(mb, r), j = j0 + column(n, e);
              const bool seen = j <= i && i < S && tseg[j - k0] == qseg[i - q0];
              s[mb][n][e] = seen ? s[mb][n][e] * scale2 : -INFINITY;
              part_max[r] = fmaxf(part_max[r], s[mb][n][e]);
            }
          online_softmax_step<D, kKeys>(s[mb], part_max, m[mb], l[mb], o[mb]);
        }
      }
      if (part == 0) {
        // This tile's values; the next keys may be in flight once the last part has asked.
        if constexpr (kParts == 1) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncthreads();
      }
      if (sees) blocks_times_tile<T, D, MB, kKeys>(o, s, sv + part * kKeys * pitch<D>());
    }
    __syncthreads();  // every warp has read the values
    if (next < keys) load_tile<T, D>(sv, vh, vs.s, next, S);
    cp_async_commit();
  }
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mb][r] = quad_sum(l[mb][r]);
      inv[r] = 1.0f / l[mb][r];
    }
    const int rows[2] = {row_of(mb, 0), row_of(mb, 1)};
    store_rows<T, D>(out + b * os.b + h * os.h, os.s, rows, S, o[mb], inv);
    if (threadIdx.x % 4 == 0)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (rows[r] < S) lse[(int64_t)bh * S + rows[r]] = (m[mb][r] + log2f(l[mb][r])) / kLog2e;
  }
}

// delta[b, h, i] = Σ_d dO · O (f32): the row term of softmax's backward, a warp per row.
template <typename T>
__device__ void row_delta(const T *__restrict__ out, const T *__restrict__ dout,
                          float *__restrict__ delta, int64_t rows, int S, int Hq, int D, Strides os,
                          Strides dos) {
  const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int64_t i = r % S, bh = r / S, h = bh % Hq, b = bh / Hq;
  const T *o = out + b * os.b + h * os.h + i * os.s;
  const T *d = dout + b * dos.b + h * dos.h + i * dos.s;
  float sum = 0.0f;
  for (int c = threadIdx.x % 32; c < D; c += 32) sum += to_f32(o[c]) * to_f32(d[c]);
  for (int w = 16; w > 0; w >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, w);
  if (threadIdx.x % 32 == 0) delta[r] = sum;
}

// dq: a block per (64 query rows, batch · query head), over the key tiles its rows see:
// P = exp(q kᵀ · scale − lse), dP = dO vᵀ, dS = P ∘ (dP − delta) · scale, dq = dS k.
// Shared memory (dynamic): q, dO, two key tiles, the value tile, and two tiles' key ids.
template <typename T, int D>
__device__ void backward_dq(const T *__restrict__ q, const T *__restrict__ k,
                            const T *__restrict__ v, const uint32_t *__restrict__ seg,
                            int ordered, const T *__restrict__ dout, const float *__restrict__ lse,
                            const float *__restrict__ delta, T *__restrict__ dq, int S, int Hq,
                            int Hkv, float scale, Strides qs, Strides ks, Strides vs,
                            Strides dos, Strides dqs) {
  unsigned char *smem = dynamic_shared_memory();
  T *sq = reinterpret_cast<T *>(smem);
  T *sdo = sq + kTile * pitch<D>(), *sv = sdo + kTile * pitch<D>();
  T *sk0 = sv + kTile * pitch<D>();  // two key tiles: sk0 + buf · kTile · pitch
  const auto sk = [&](int buf) { return sk0 + buf * kTile * pitch<D>(); };
  uint32_t *sseg = reinterpret_cast<uint32_t *>(sv + 3 * kTile * pitch<D>());  // [2][kTile]
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
  const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
  const uint32_t *segb = seg + (int64_t)b * S;
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  uint32_t rseg[2];
  float lse2[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = row[r] < S;
    rseg[r] = in ? segb[row[r]] : 0;
    lse2[r] = in ? lse[(int64_t)bh * S + row[r]] * kLog2e : 0.0f;
    drow[r] = in ? delta[(int64_t)bh * S + row[r]] : 0.0f;
  }
  const float scale2 = scale * kLog2e;
  const T *kh = k + b * ks.b + kvh * ks.h, *vh = v + b * vs.b + kvh * vs.h;
  const int keys = min(S, q0 + kTile);
  const int first = first_key_tile(segb, ordered, q0, S);
  // q, dO and the first keys (with their ids) as one group, the first values as the next.
  load_tile<T, D>(sq, q + b * qs.b + h * qs.h, qs.s, q0, S);
  load_tile<T, D>(sdo, dout + b * dos.b + h * dos.h, dos.s, q0, S);
  load_tile<T, D>(sk(0), kh, ks.s, first, S);
  load_row_values(sseg, segb, first, S);
  cp_async_commit();
  load_tile<T, D>(sv, vh, vs.s, first, S);
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  for (int k0 = first, buf = 0; k0 < keys; k0 += kTile, buf ^= 1) {
    const int next = k0 + kTile;  // a tile to load when below `keys`
    // The next keys into the other buffer, whose last reader (the previous tile's dS k) is
    // behind the barrier that closed the previous iteration.
    if (next < keys) {
      load_tile<T, D>(sk(buf ^ 1), kh, ks.s, next, S);
      load_row_values(sseg + (buf ^ 1) * kTile, segb, next, S);
    }
    cp_async_commit();
    cp_async_wait<2>();  // this tile's keys; its values and the next keys may be in flight
    __syncthreads();
    float s[kTile / 8][4], dp[kTile / 8][4];
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
    rows_times_tile_t<T, D>(s, sq, warp * 16, sk(buf));
    cp_async_wait<1>();  // this tile's values
    __syncthreads();
    rows_times_tile_t<T, D>(dp, sdo, warp * 16, sv);
    __syncthreads();  // every warp has read the values: the next ones may come in
    if (next < keys) load_tile<T, D>(sv, vh, vs.s, next, S);
    cp_async_commit();
    const uint32_t *tseg = sseg + buf * kTile;
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, j = k0 + column(n, e);
        const bool seen = j <= row[r] && row[r] < S && tseg[j - k0] == rseg[r];
        const float p = seen ? exp2f(s[n][e] * scale2 - lse2[r]) : 0.0f;
        s[n][e] = p * (dp[n][e] - drow[r]) * scale;
      }
    block_times_tile<T, D>(acc, s, sk(buf));
    __syncthreads();  // every warp has read this tile's keys and ids
  }
  const float one[2] = {1.0f, 1.0f};
  store_rows<T, D>(dq + b * dqs.b + h * dqs.h, dqs.s, row, S, acc, one);
}

// dk and dv: a block per (64 keys, batch · key/value head), over every query head of its group
// and the query tiles that see its keys. With the keys as rows: Pᵀ = exp(k qᵀ · scale − lse),
// dv += Pᵀ dO, dPᵀ = v dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale, dk += dSᵀ q.
// Shared memory (dynamic): k, v, dO, two query tiles, then two tiles' query ids, lse and
// delta (the keys' ids stay in registers).
template <typename T, int D>
__device__ void backward_dkdv(const T *__restrict__ q, const T *__restrict__ k,
                              const T *__restrict__ v, const uint32_t *__restrict__ seg,
                              int ordered, const T *__restrict__ dout, const float *__restrict__ lse,
                              const float *__restrict__ delta, T *__restrict__ dk,
                              T *__restrict__ dv, int S, int Hq, int Hkv, float scale, Strides qs,
                              Strides ks, Strides vs, Strides dos, Strides dks, Strides dvs) {
  unsigned char *smem = dynamic_shared_memory();
  T *sk = reinterpret_cast<T *>(smem);
  T *sv = sk + kTile * pitch<D>(), *sdo = sv + kTile * pitch<D>();
  T *sq0 = sdo + kTile * pitch<D>();  // two query tiles: sq0 + buf · kTile · pitch
  const auto sq = [&](int buf) { return sq0 + buf * kTile * pitch<D>(); };
  // Per query tile, by its parity: ids, lse and delta, kTile each.
  uint32_t *rows_at = reinterpret_cast<uint32_t *>(sdo + 3 * kTile * pitch<D>());
  const int k0 = blockIdx.x * kTile;  // the first tiles see the most queries: launched first
  const int bkv = blockIdx.y, b = bkv / Hkv, kvh = bkv % Hkv, group = Hq / Hkv;
  const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
  const uint32_t *segb = seg + (int64_t)b * S;
  const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  uint32_t kseg[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) kseg[r] = key[r] < S ? segb[key[r]] : 0;
  const float scale2 = scale * kLog2e;

  // The (head, query tile) pairs in order: every head of the group over the same tiles.
  const int tiles = query_tiles_seeing(segb, ordered, k0, S), steps = group * tiles;
  // Starts loading step t's queries and their ids, lse and delta into buffer `buf`.
  const auto load_queries = [&](int t, int buf) {
    const int h = kvh * group + t / tiles, q0 = k0 + (t % tiles) * kTile;
    const int64_t bh = (int64_t)b * Hq + h;
    load_tile<T, D>(sq(buf), q + b * qs.b + h * qs.h, qs.s, q0, S);
    uint32_t *at = rows_at + buf * 3 * kTile;
    load_row_values(at, segb, q0, S);
    load_row_values(reinterpret_cast<float *>(at + kTile), lse + bh * S, q0, S);
    load_row_values(reinterpret_cast<float *>(at + 2 * kTile), delta + bh * S, q0, S);
  };
  const auto load_dout = [&](int t) {
    const int h = kvh * group + t / tiles, q0 = k0 + (t % tiles) * kTile;
    load_tile<T, D>(sdo, dout + b * dos.b + h * dos.h, dos.s, q0, S);
  };
  // k, v and the first queries as one group, the first dO as the next.
  load_tile<T, D>(sk, k + b * ks.b + kvh * ks.h, ks.s, k0, S);
  load_tile<T, D>(sv, v + b * vs.b + kvh * vs.h, vs.s, k0, S);
  load_queries(0, 0);
  cp_async_commit();
  load_dout(0);
  cp_async_commit();

  float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.0f;
  for (int t = 0, buf = 0; t < steps; ++t, buf ^= 1) {
    const int q0 = k0 + (t % tiles) * kTile;
    // The next queries into the other buffer, whose last reader (the previous step's dSᵀ q)
    // is behind the barrier that closed the previous iteration.
    if (t + 1 < steps) load_queries(t + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<2>();  // this step's queries; its dO and the next queries may be in flight
    __syncthreads();
    const uint32_t *qseg = rows_at + buf * 3 * kTile;
    const float *slse = reinterpret_cast<const float *>(qseg + kTile);
    const float *sdelta = reinterpret_cast<const float *>(qseg + 2 * kTile);
    float st[kTile / 8][4], dpt[kTile / 8][4];
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
    rows_times_tile_t<T, D>(st, sk, warp * 16, sq(buf));
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, c = column(n, e), i = q0 + c;
        const bool seen = key[r] <= i && i < S && qseg[c] == kseg[r];
        st[n][e] = seen ? exp2f(st[n][e] * scale2 - slse[c] * kLog2e) : 0.0f;
      }
    cp_async_wait<1>();  // this step's dO
    __syncthreads();
    block_times_tile<T, D>(dva, st, sdo);
    rows_times_tile_t<T, D>(dpt, sv, warp * 16, sdo);
    __syncthreads();  // every warp has read dO: the next may come in
    if (t + 1 < steps) load_dout(t + 1);
    cp_async_commit();
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] *= (dpt[n][e] - sdelta[column(n, e)]) * scale;
    block_times_tile<T, D>(dka, st, sq(buf));
    __syncthreads();  // every warp has read this step's queries and their row values
  }
  const float one[2] = {1.0f, 1.0f};
  store_rows<T, D>(dk + b * dks.b + kvh * dks.h, dks.s, key, S, dka, one);
  store_rows<T, D>(dv + b * dvs.b + kvh * dvs.h, dvs.s, key, S, dva, one);
}

}  // namespace

#define FLASH_ENTRIES(T, NAME, D)                                                               \
  extern "C" __global__ void __launch_bounds__(kThreads)                                        \
      flash_forward_##NAME##_d##D(const T *q, const T *k, const T *v, const uint32_t *seg,      \
                                  int ordered, T *out, float *lse, int S, int Hq, int Hkv,     \
                                  float scale, Strides qs, Strides ks, Strides vs,             \
                                  Strides os) {                                                \
    forward<T, D, 1>(q, k, v, seg, ordered, out, lse, S, Hq, Hkv, scale, qs, ks, vs, os);      \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(kThreads) flash_forward_wide_##NAME##_d##D(     \
      const T *q, const T *k, const T *v, const uint32_t *seg, int ordered, T *out, float *lse, \
      int S, int Hq, int Hkv, float scale, Strides qs, Strides ks, Strides vs, Strides os) {    \
    forward<T, D, 2>(q, k, v, seg, ordered, out, lse, S, Hq, Hkv, scale, qs, ks, vs, os);      \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(kThreads) flash_backward_dq_##NAME##_d##D(      \
      const T *q, const T *k, const T *v, const uint32_t *seg, int ordered, const T *dout,     \
      const float *lse, const float *delta, T *dq, int S, int Hq, int Hkv, float scale,        \
      Strides qs, Strides ks, Strides vs, Strides dos, Strides dqs) {                           \
    backward_dq<T, D>(q, k, v, seg, ordered, dout, lse, delta, dq, S, Hq, Hkv, scale, qs, ks,  \
                      vs, dos, dqs);                                                            \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(kThreads) flash_backward_dkdv_##NAME##_d##D(    \
      const T *q, const T *k, const T *v, const uint32_t *seg, int ordered, const T *dout,     \
      const float *lse, const float *delta, T *dk, T *dv, int S, int Hq, int Hkv, float scale, \
      Strides qs, Strides ks, Strides vs, Strides dos, Strides dks, Strides dvs) {              \
    backward_dkdv<T, D>(q, k, v, seg, ordered, dout, lse, delta, dk, dv, S, Hq, Hkv, scale,    \
                        qs, ks, vs, dos, dks, dvs);                                             \
  }

#define FLASH_DTYPE(T, NAME)                                                                    \
  FLASH_ENTRIES(T, NAME, 64)                                                                    \
  FLASH_ENTRIES(T, NAME, 128)                                                                   \
  extern "C" __global__ void flash_delta_##NAME(const T *out, const T *dout, float *delta,      \
                                                int64_t rows, int S, int Hq, int D, Strides os, \
                                                Strides dos) {                                  \
    row_delta<T>(out, dout, delta, rows, S, Hq, D, os, dos);                                    \
  }

FLASH_DTYPE(__nv_bfloat16, bf16)
FLASH_DTYPE(__half, f16)
