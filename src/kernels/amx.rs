//! bf16 matrix products on AMX tiles, for inference with frozen weights (`--dtype bf16` on the CPU).
//!
//! One product serves every use: C (m × n, f32) = Σ_taps A_tap (m × k, bf16) · B_tap (k × n,
//! bf16), each operand read through a [`Layout`] of byte offsets with a start per tap. Linear
//! layers: the activations (row-major, [`PackedA`]) times the weights ([`PackedB`]: k-pairs in
//! 32-column panels). Stride-1 convolutions ([`conv_matmul`]): the weights of each kernel
//! position ([`PackedRows`]) times the zero-padded image as channel pairs ([`PackedCols`]),
//! shifted by the position's offset on the padded width — the shifted-GEMM idea of
//! [`super::conv`] with the taps summed inside the tile registers, so C (the NCHW output planes
//! on the padded width) is written once. Attention ([`matmul_cols`]): activations on both sides.
//! Weights are converted and packed once at load, halving their memory; B operands hold bf16
//! pairs adjacent along k, as `tdpbf16ps` reads them.
//!
//! The micro-kernel holds a 32 × 32 block of C in four tiles and runs the whole reduction over
//! k and the taps before one store; buffers are 64-byte aligned (unaligned tile loads ran at
//! half speed: ../shared/notes/cpu-kernels.md), though a convolution's shifted taps read the
//! image at 4-byte offsets. Sizes are padded to multiples of 32 with zeros,
//! so the kernel has no tails. Where the CPU has no AMX (or Linux refuses the tile state) a
//! portable loop computes the same sums from the same bf16 inputs with f32 accumulation: the
//! layout and packing code is tested on every machine, the tile instructions where they exist.
//!
//! AMX intrinsics are unstable in Rust; the tile instructions are written as inline `asm!`,
//! which is stable. The compiler never allocates tile registers, so tiles live across the
//! separate `asm!` statements of one block; a task configures the tiles on its own thread and
//! releases them before it returns, so no tile state crosses a point where rayon switches work.

use std::marker::PhantomData;
use std::sync::OnceLock;

/// The tile sizes: every product dimension is padded to a multiple of this.
pub const TILE: usize = 32;

/// Whether the AMX path runs here: the CPU has AMX-BF16 and AMX-TILE, Linux granted this
/// process the tile state (without that grant the first tile instruction raises SIGILL), and
/// `LCM_NO_AMX` is not set (it runs the portable loop instead, as on a CPU without tiles).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        std::env::var_os("LCM_NO_AMX").is_none()
            && super::cpu::features().amx_bf16
            && request_tile_state()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) only asks the kernel for a permission;
    // the syscall clobbers rcx and r11 and touches no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// `x` rounded to bf16 (nearest even; NaN stays NaN, quieted), as the high half of a u32 whose
/// low half is zero. Branch-free and in 32-bit lanes throughout, so loops over it vectorise
/// (`half`'s conversion branches on NaN per element; a u16 form left the k-pair packing
/// loops scalar: 12 % of a bf16 U-Net step).
#[inline(always)]
fn rounded_high(x: f32) -> u32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { bits | 0x40_0000 } else { rounded }) & 0xffff_0000
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    (rounded_high(x) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to the nearest bf16 value, as f32.
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// `x` rounded up to a multiple of [`TILE`].
pub const fn pad(x: usize) -> usize {
    x.div_ceil(TILE) * TILE
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zero-initialised buffer of `T` (u16 or f32) on 64-byte lines.
pub struct Aligned<T: Copy> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Copy> Aligned<T> {
    const fn new() -> Self {
        Self {
            lines: Vec::new(),
            len: 0,
            _t: PhantomData,
        }
    }

    /// `len` zeros (reusing the allocation).
    fn zeroed(&mut self, len: usize) {
        self.lines.clear();
        self.reused(len);
    }

    /// `len` elements, keeping what the allocation held (zeros where it grows): for callers
    /// that write every element they read, so a multi-megabyte buffer is not zeroed per call.
    fn reused(&mut self, len: usize) {
        let bytes = len * std::mem::size_of::<T>();
        self.lines.resize(bytes.div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` T's worth of initialised bytes, aligned to 64,
        // and T is u16 or f32, for which every bit pattern is a value.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, through the unique borrow.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// Frozen weights as the right-hand side of [`matmul`]: `taps` matrices of k × n, bf16, packed
/// as `[tap][panel of 32 columns][k/2][32 columns][2]` with k and n padded with zeros.
pub struct PackedB {
    data: Aligned<u16>,
    pub taps: usize,
    pub k: usize,
    pub n: usize,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "PackedB({} × {} × {}, bf16)", self.taps, self.k, self.n)
    }
}

impl PackedB {
    /// Packs `get(tap, k, n)` for every tap < `taps`, row < `k`, column < `n`.
    pub fn pack(
        taps: usize,
        k: usize,
        n: usize,
        get: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Self {
        use rayon::prelude::*;
        let (kp, np) = (pad(k), pad(n));
        let mut data = Aligned::new();
        data.zeroed(taps * kp * np);
        let panels = np / TILE;
        // One (tap, panel) block of kp × 32 per task.
        data.as_mut_slice()
            .par_chunks_mut(kp * TILE)
            .enumerate()
            .for_each(|(i, block)| {
                let (t, p) = (i / panels, i % panels);
                for j in 0..TILE.min(n.saturating_sub(p * TILE)) {
                    for r in 0..k {
                        block[(r / 2) * 2 * TILE + 2 * j + r % 2] =
                            to_bf16(get(t, r, p * TILE + j));
                    }
                }
            });
        Self { data, taps, k, n }
    }

    fn layout(&self) -> Layout {
        let (kp, np) = (pad(self.k), pad(self.n));
        let panel = kp * TILE * 2;
        Layout {
            taps: (0..self.taps).map(|t| t * (np / TILE) * panel).collect(),
            block: panel,
            stride: 2 * TILE * 2,
            k_step: (TILE / 2) * 2 * TILE * 2,
        }
    }
}

/// Activations as the left-hand side of [`matmul`]: `rows` × k bf16, row-major with row stride
/// `pad(k)`, plus zero rows after them that shifted taps may read.
pub struct PackedA {
    data: Aligned<u16>,
    pub rows: usize,
    pub k: usize,
}

impl PackedA {
    pub const fn new() -> Self {
        Self {
            data: Aligned::new(),
            rows: 0,
            k: 0,
        }
    }

    /// Resets to `rows` zero rows of width `k` (padded), `extra` zero rows after the padded
    /// rows; returns the buffer to fill (row stride `pad(k)`).
    pub fn reset(&mut self, rows: usize, k: usize, extra: usize) -> &mut [u16] {
        self.rows = rows;
        self.k = k;
        self.data.zeroed((pad(rows) + extra) * pad(k));
        self.data.as_mut_slice()
    }

    /// As [`Self::reset`] without extra rows, but only the padding is zeroed: the caller must
    /// write columns < k of every row < `rows` (the buffer's row stride is `pad(k)`).
    pub fn reset_padding(&mut self, rows: usize, k: usize) -> &mut [u16] {
        self.rows = rows;
        self.k = k;
        let kp = pad(k);
        self.data.reused(pad(rows) * kp);
        let data = self.data.as_mut_slice();
        if kp > k {
            for row in data[..rows * kp].chunks_exact_mut(kp) {
                row[k..].fill(0);
            }
        }
        data[rows * kp..].fill(0);
        data
    }
}

impl Default for PackedA {
    fn default() -> Self {
        Self::new()
    }
}

/// Frozen convolution weights as the left-hand side of [`conv_matmul`]: `taps` matrices of
/// m × k (c_out × c_in) bf16, row-major with row stride `pad(k)`, each padded to `pad(m)` rows.
pub struct PackedRows {
    data: Aligned<u16>,
    pub taps: usize,
    pub m: usize,
    pub k: usize,
}

impl std::fmt::Debug for PackedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "PackedRows({} × {} × {}, bf16)",
            self.taps, self.m, self.k
        )
    }
}

impl PackedRows {
    /// Packs `get(tap, row, k)` for every tap < `taps`, row < `m`, column < `k`.
    pub fn pack(
        taps: usize,
        m: usize,
        k: usize,
        get: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Self {
        use rayon::prelude::*;
        let kp = pad(k);
        let mut data = Aligned::new();
        data.zeroed(taps * pad(m) * kp);
        data.as_mut_slice()
            .par_chunks_mut(kp)
            .enumerate()
            .for_each(|(i, row)| {
                let (t, r) = (i / pad(m), i % pad(m));
                if r < m {
                    for (j, v) in row[..k].iter_mut().enumerate() {
                        *v = to_bf16(get(t, r, j));
                    }
                }
            });
        Self { data, taps, m, k }
    }
}

/// Activations as the right-hand side of [`conv_matmul`]: k × `cols` bf16 stored as k-pairs,
/// `[pad(k)/2][cols][2]` (each u32 holds rows 2r and 2r + 1 of one column, low half first).
pub struct PackedCols {
    data: Aligned<u32>,
    pub k: usize,
    pub cols: usize,
}

impl PackedCols {
    pub const fn new() -> Self {
        Self {
            data: Aligned::new(),
            k: 0,
            cols: 0,
        }
    }

    /// Resets to zeros for k rows of `cols` columns; returns the k-pair rows to fill (`cols`
    /// words each).
    pub fn reset(&mut self, k: usize, cols: usize) -> &mut [u32] {
        self.k = k;
        self.cols = cols;
        self.data.zeroed(pad(k) / 2 * cols);
        self.data.as_mut_slice()
    }

    /// As [`Self::reset`], but only the k padding's rows are zeroed: the caller must write
    /// every word of the first `k.div_ceil(2)` rows (with zeros as the high halves of the last
    /// one where k is odd).
    pub fn reset_padding(&mut self, k: usize, cols: usize) -> &mut [u32] {
        self.k = k;
        self.cols = cols;
        self.data.reused(pad(k) / 2 * cols);
        let data = self.data.as_mut_slice();
        data[k.div_ceil(2) * cols..].fill(0);
        data
    }
}

impl Default for PackedCols {
    fn default() -> Self {
        Self::new()
    }
}

/// Two f32 as one k-pair word of [`PackedCols`]: `to_bf16(lo) | to_bf16(hi) << 16`.
#[inline(always)]
pub fn pair(lo: f32, hi: f32) -> u32 {
    rounded_high(lo) >> 16 | rounded_high(hi)
}

// `dst[i] = to_bf16(src[i])`, vectorised at AVX-512 where the CPU has it.
super::avx512_dispatch!(pub fn convert(src: &[f32], dst: &mut [u16]) => convert_body);

#[inline(always)]
fn convert_body(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

// `dst[i] = pair(lo[i], hi[i])` (hi taken as zeros where it is `None`): two rows of an operand
// as k-pairs.
super::avx512_dispatch!(pub fn pair_rows(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) => pair_rows_body);

#[inline(always)]
fn pair_rows_body(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    match hi {
        Some(hi) => {
            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair(l, h);
            }
        }
        None => {
            for (d, &l) in dst.iter_mut().zip(lo) {
                *d = pair(l, 0.0);
            }
        }
    }
}

/// C (`pad(a.rows)` × `pad(b.n)`, row-major, f32, overwritten; `c` may be longer) = Σ_t A
/// shifted down by `offsets[t]` rows · B_t. Every row an offset reaches must lie in `a`'s
/// buffer (the `extra` rows of [`PackedA::reset`]).
pub fn matmul(a: &PackedA, offsets: &[usize], b: &PackedB, c: &mut Vec<f32>) {
    assert_eq!(offsets.len(), b.taps, "one row offset per tap");
    assert_eq!(pad(a.k), pad(b.k), "inner sizes");
    let lda = pad(a.k) * 2;
    let la = Layout {
        taps: offsets.iter().map(|o| o * lda).collect(),
        block: TILE * lda,
        stride: lda,
        k_step: TILE * 2,
    };
    let sizes = (pad(a.rows) / TILE, pad(b.n) / TILE, pad(b.k) / TILE);
    let (a, b) = (
        bytes(a.data.as_slice()),
        (bytes(b.data.as_slice()), b.layout()),
    );
    product(sizes, (a, la), b, c, true);
}

/// C (`pad(a.m)` × `pad(n)`, row-major, f32, overwritten; `c` may be longer) = Σ_t A_t · B
/// shifted left by `offsets[t]` columns: a convolution with its output columns on the padded
/// image's width. Every column an offset reaches must lie in `b`.
pub fn conv_matmul(a: &PackedRows, b: &PackedCols, n: usize, offsets: &[usize], c: &mut Vec<f32>) {
    assert_eq!(offsets.len(), a.taps, "one column offset per tap");
    assert_eq!(pad(a.k), pad(b.k), "inner sizes");
    let (mp, kp) = (pad(a.m), pad(a.k));
    let lda = kp * 2;
    let la = Layout {
        taps: (0..a.taps).map(|t| t * mp * lda).collect(),
        block: TILE * lda,
        stride: lda,
        k_step: TILE * 2,
    };
    let ldb = b.cols * 4;
    let lb = Layout {
        taps: offsets.iter().map(|o| o * 4).collect(),
        block: TILE * 4,
        stride: ldb,
        k_step: (TILE / 2) * ldb,
    };
    let sizes = (mp / TILE, pad(n) / TILE, kp / TILE);
    product(
        sizes,
        (bytes(a.data.as_slice()), la),
        (bytes(b.data.as_slice()), lb),
        c,
        true,
    );
}

/// C (`pad(a.rows)` × `pad(n)`, row-major, f32, overwritten; `c` may be longer) = A · B for
/// activations on both sides (attention's q·kᵀ and p·v): B's k rows as k-pairs of `b.cols`
/// columns, of which the first `n` are used. `parallel: false` keeps it on this thread (for
/// callers that already split their work over threads).
pub fn matmul_cols(a: &PackedA, b: &PackedCols, n: usize, c: &mut Vec<f32>, parallel: bool) {
    assert_eq!(pad(a.k), pad(b.k), "inner sizes");
    assert!(n <= b.cols, "{n} columns of {}", b.cols);
    let lda = pad(a.k) * 2;
    let la = Layout {
        taps: vec![0],
        block: TILE * lda,
        stride: lda,
        k_step: TILE * 2,
    };
    let ldb = b.cols * 4;
    let lb = Layout {
        taps: vec![0],
        block: TILE * 4,
        stride: ldb,
        k_step: (TILE / 2) * ldb,
    };
    let sizes = (pad(a.rows) / TILE, pad(n) / TILE, pad(a.k) / TILE);
    product(
        sizes,
        (bytes(a.data.as_slice()), la),
        (bytes(b.data.as_slice()), lb),
        c,
        parallel,
    );
}

fn bytes<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: u16/u32 slices viewed as their bytes (no padding, any alignment for u8).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

/// Where the tile kernel finds an operand's elements, as byte offsets into its buffer. A (m × k)
/// element (i, k) of tap t: `taps[t] + (i/32)·block + (i%32)·stride + (k/32)·k_step + (k%32)·2`;
/// B (k × n) element (k, j): `taps[t] + (j/32)·block + (k%32/2)·stride + (k/32)·k_step +
/// (j%32)·4 + (k%2)·2` (k-pairs, as `tdpbf16ps` reads them).
struct Layout {
    taps: Vec<usize>,
    block: usize,
    stride: usize,
    k_step: usize,
}

impl Layout {
    /// One past the last byte read for blocks < `blocks` and k-blocks < `kblocks`, given the
    /// tile's rows (`rows` of `stride`) and row width.
    fn extent(&self, blocks: usize, kblocks: usize, rows: usize, width: usize) -> usize {
        let last_tap = self.taps.iter().copied().max().unwrap_or(0);
        last_tap
            + (blocks - 1) * self.block
            + (kblocks - 1) * self.k_step
            + (rows - 1) * self.stride
            + width
    }
}

/// C (m_blocks·32 × n_blocks·32, row-major, f32) = Σ_taps Σ_k A · B, on tiles where the CPU has
/// them, else in a portable loop over the same bf16 values.
fn product(
    (mblocks, nblocks, kblocks): (usize, usize, usize),
    (a, la): (&[u8], Layout),
    (b, lb): (&[u8], Layout),
    c: &mut Vec<f32>,
    parallel: bool,
) {
    assert_eq!(la.taps.len(), lb.taps.len(), "taps");
    let (mp, np) = (mblocks * TILE, nblocks * TILE);
    if mp == 0 || np == 0 {
        c.clear();
        return;
    }
    if kblocks > 0 {
        assert!(
            la.extent(mblocks, kblocks, 32, 64) <= a.len(),
            "A read past its buffer"
        );
        assert!(
            lb.extent(nblocks, kblocks, 16, 128) <= b.len(),
            "B read past its buffer"
        );
    }
    if available() && kblocks > 0 && !FORCE_PORTABLE.with(|f| f.get()) {
        // Every element is stored by the tiles: no need to zero it first.
        c.resize(mp * np, 0.0);
        amx_product(
            (mblocks, nblocks, kblocks),
            (a, &la),
            (b, &lb),
            &mut c[..mp * np],
            parallel,
        );
    } else {
        c.clear();
        c.resize(mp * np, 0.0);
        portable_product((mblocks, nblocks, kblocks), (a, &la), (b, &lb), c, parallel);
    }
}

thread_local! {
    /// Tests: run the portable loop even where the CPU has tiles.
    static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The same sums without tiles: f32 products of the bf16 values, f32 accumulation.
fn portable_product(
    (_, nblocks, kblocks): (usize, usize, usize),
    (a, la): (&[u8], &Layout),
    (b, lb): (&[u8], &Layout),
    c: &mut [f32],
    parallel: bool,
) {
    use rayon::prelude::*;
    let np = nblocks * TILE;
    let at = |o: usize| from_bf16(u16::from_le_bytes([a[o], a[o + 1]]));
    let bt = |o: usize| from_bf16(u16::from_le_bytes([b[o], b[o + 1]]));
    let row = |(i, row): (usize, &mut [f32])| {
        for (&ta, &tb) in la.taps.iter().zip(&lb.taps) {
            let arow = ta + (i / TILE) * la.block + (i % TILE) * la.stride;
            for kk in 0..kblocks * TILE {
                let x = at(arow + (kk / TILE) * la.k_step + (kk % TILE) * 2);
                if x == 0.0 {
                    continue;
                }
                let brow =
                    tb + (kk / TILE) * lb.k_step + (kk % TILE / 2) * lb.stride + (kk % 2) * 2;
                for (j, y) in row.iter_mut().enumerate() {
                    *y += x * bt(brow + (j / TILE) * lb.block + (j % TILE) * 4);
                }
            }
        }
    };
    // Serial when asked: a caller inside a rayon task may hold per-thread buffers that a stolen
    // task would need.
    if parallel {
        c.par_chunks_mut(np).enumerate().for_each(row);
    } else {
        c.chunks_mut(np).enumerate().for_each(row);
    }
}

/// Tile configuration (palette 1): tiles 0–7 all 16 rows × 64 bytes — C blocks 0–3 (16 × 16
/// f32), A 4–5 (16 rows × 32 bf16), B 6–7 (16 k-pairs × 16 columns × 2).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Raw pointers handed to the rayon tasks, which write disjoint blocks of C.
#[derive(Clone, Copy)]
struct Ptrs {
    a: *const u8,
    b: *const u8,
    c: *mut u8,
}
// SAFETY: the tasks read a and b and write disjoint 32 × 32 blocks of c.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

/// Row blocks (of 32) that one task covers at most: A's rows for them stay in L2 across the
/// column blocks.
const CHUNK_BLOCKS: usize = 8;

fn amx_product(
    (mblocks, nblocks, kblocks): (usize, usize, usize),
    (a, la): (&[u8], &Layout),
    (b, lb): (&[u8], &Layout),
    c: &mut [f32],
    parallel: bool,
) {
    use rayon::prelude::*;
    // Row blocks shared evenly between chunks of at most CHUNK_BLOCKS.
    let mchunks = mblocks.div_ceil(CHUNK_BLOCKS);
    let per_chunk = mblocks.div_ceil(mchunks);
    // Enough tasks to keep every thread busy, column blocks grouped so each task reuses its A
    // rows. (Running the rows outermost where A is the larger operand — the 8² and 16² levels'
    // weights — showed no gain beyond this VM's noise.)
    let target = 4 * rayon::current_num_threads();
    let groups = target.div_ceil(mchunks).clamp(1, nblocks);
    let per_group = nblocks.div_ceil(groups);
    let groups = nblocks.div_ceil(per_group);
    let ptrs = Ptrs {
        a: a.as_ptr(),
        b: b.as_ptr(),
        c: c.as_mut_ptr().cast(),
    };
    let ldc = nblocks * TILE * 4;
    let offs: Vec<(usize, usize)> = la
        .taps
        .iter()
        .copied()
        .zip(lb.taps.iter().copied())
        .collect();
    let run = |task: usize| {
        let (mc, g) = (task / groups, task % groups);
        let p = ptrs;
        let rows = mc * per_chunk..((mc + 1) * per_chunk).min(mblocks);
        let cols = g * per_group..((g + 1) * per_group).min(nblocks);
        // SAFETY: the CPU has AMX and the tile state was granted (`available`); every address
        // read lies inside a or b (their extents are asserted in `product`) and each task
        // writes only its own 32 × 32 blocks of c.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
            for j in cols {
                for i in rows.clone() {
                    block(
                        (p.a.add(i * la.block), la.stride, la.k_step),
                        (p.b.add(j * lb.block), lb.stride, lb.k_step),
                        &offs,
                        kblocks,
                        p.c.add(i * TILE * ldc + j * TILE * 4),
                        ldc,
                    );
                }
            }
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    };
    let tasks = mchunks * groups;
    if !parallel || tasks == 1 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// One 32 × 32 block of C: the sum over the taps and k of A (`a`: base, row stride, step per
/// 32 of k) times B (`b`: base, k-pair stride, step per 32 of k), each tap at its byte offsets
/// `offs`, stored to `c` (row stride `ldc` bytes).
///
/// # Safety
/// Tiles configured on this thread; every address read or written is inside its buffer.
#[inline(always)]
unsafe fn block(
    (a, lda, a_step): (*const u8, usize, usize),
    (b, ldb, b_step): (*const u8, usize, usize),
    offs: &[(usize, usize)],
    kblocks: usize,
    c: *mut u8,
    ldc: usize,
) {
    use std::arch::asm;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for &(oa, ob) in offs {
        let mut pa = a.add(oa);
        let mut pb = b.add(ob);
        for _ in 0..kblocks {
            asm!(
                "tileloadd tmm4, [{a0} + {lda} * 1]",
                "tileloadd tmm5, [{a1} + {lda} * 1]",
                "tileloadd tmm6, [{b0} + {ldb} * 1]",
                "tileloadd tmm7, [{b1} + {ldb} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) pa,
                a1 = in(reg) pa.add(16 * lda),
                lda = in(reg) lda,
                b0 = in(reg) pb,
                b1 = in(reg) pb.add(64),
                ldb = in(reg) ldb,
                options(nostack, readonly)
            );
            pa = pa.add(a_step);
            pb = pb.add(b_step);
        }
    }
    asm!(
        "tilestored [{c0} + {ldc} * 1], tmm0",
        "tilestored [{c1} + {ldc} * 1], tmm1",
        "tilestored [{c2} + {ldc} * 1], tmm2",
        "tilestored [{c3} + {ldc} * 1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(64),
        c2 = in(reg) c.add(16 * ldc),
        c3 = in(reg) c.add(16 * ldc + 64),
        ldc = in(reg) ldc,
        options(nostack)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [-1, 1).
    fn noise(i: usize, salt: usize) -> f32 {
        let x = (i as u64 ^ (salt as u64) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// The branch-free rounding against `half`'s over ties, subnormals, infinities and NaNs.
    #[test]
    fn rounds_as_half_does() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie, rounds to even (up)
            f32::from_bits(0x7f7f_ffff), // rounds up to infinity
        ];
        let sweep = (0..1u64 << 20).map(|i| f32::from_bits((i * 4099) as u32));
        for x in specials.into_iter().chain(sweep) {
            let want = half::bf16::from_f32(x);
            let got = to_bf16(x);
            if x.is_nan() {
                assert!(from_bf16(got).is_nan(), "{x:?}");
            } else {
                assert_eq!(got, want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
        // The k-pair form agrees with two separate roundings.
        for (i, x) in specials.into_iter().enumerate() {
            let y = f32::from_bits((i as u32).wrapping_mul(0x9E37_79B9));
            assert_eq!(pair(x, y), to_bf16(x) as u32 | (to_bf16(y) as u32) << 16);
        }
        let sweep: Vec<f32> = (0..1u32 << 16)
            .map(|i| f32::from_bits(i * 65_521))
            .collect();
        let mut words = vec![0; sweep.len() - 1];
        pair_rows(&sweep[..sweep.len() - 1], Some(&sweep[1..]), &mut words);
        for ((w, &lo), &hi) in words.iter().zip(&sweep).zip(&sweep[1..]) {
            let (l, h) = (from_bf16(*w as u16), from_bf16((*w >> 16) as u16));
            for (got, x) in [(l, lo), (h, hi)] {
                if x.is_nan() {
                    assert!(got.is_nan(), "{x:?}");
                } else {
                    assert_eq!(got.to_bits(), from_bf16(to_bf16(x)).to_bits(), "{x:e}");
                }
            }
        }
        assert!(from_bf16(to_bf16(f32::from_bits(0x7fff_ffff))).is_nan());
        assert!(from_bf16(to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
    }

    /// The paths to check here: the portable loop, and the tiles where the CPU has them.
    fn paths() -> Vec<(&'static str, bool)> {
        let mut p = vec![("portable", true)];
        if available() {
            p.push(("AMX", false));
        } else {
            println!("this CPU has no AMX tiles: only the portable loop is checked here");
        }
        p
    }

    fn on_path<T>(portable: bool, f: impl FnOnce() -> T) -> T {
        FORCE_PORTABLE.with(|p| p.set(portable));
        let out = f();
        FORCE_PORTABLE.with(|p| p.set(false));
        out
    }

    /// Against f64 sums of the same bf16-rounded inputs, over sizes that are not multiples of
    /// 16 or 32, with one tap and with shifted taps: the portable loop everywhere, the tile
    /// kernel where the CPU has AMX (the test says which ran).
    #[test]
    fn matmul_matches_an_f64_reference_of_the_rounded_inputs() {
        for (rows, k, n, offsets) in [
            (1, 1, 1, vec![0]),
            (5, 40, 33, vec![0]),
            (77, 768, 3072 / 4, vec![0]),
            (33, 65, 17, vec![0, 1, 7]),
            (100, 96, 64, vec![0, 3, 12, 13, 14]),
            (300, 40, 130, vec![0, 2]),
        ] {
            let max_off = *offsets.iter().max().unwrap();
            let mut a = PackedA::new();
            let kp = pad(k);
            let av = a.reset(rows, k, max_off);
            let mut x = vec![0f32; (rows + max_off) * k];
            for r in 0..rows + max_off {
                for j in 0..k {
                    let v = round_bf16(noise(r * k + j, 1));
                    x[r * k + j] = v;
                    av[r * kp + j] = to_bf16(v);
                }
            }
            let w = |t: usize, r: usize, c: usize| noise((t * k + r) * n + c, 2) * 0.5;
            let b = PackedB::pack(offsets.len(), k, n, w);
            for (name, portable) in paths() {
                let mut c = Vec::new();
                on_path(portable, || matmul(&a, &offsets, &b, &mut c));
                let got = |i: usize, j: usize| c[i * pad(n) + j];
                let want = |i: usize, j: usize| {
                    let x = &x;
                    offsets.iter().enumerate().flat_map(move |(t, &o)| {
                        (0..k)
                            .map(move |r| x[(i + o) * k + r] as f64 * round_bf16(w(t, r, j)) as f64)
                    })
                };
                check(name, (rows, n), got, want);
            }
        }
    }

    /// The convolution form (weights on the left, activation k-pairs shifted by column
    /// offsets on the right) against f64, on both paths.
    #[test]
    fn conv_matmul_matches_an_f64_reference_of_the_rounded_inputs() {
        for (m, k, n, offsets) in [
            (1, 1, 1, vec![0]),
            (33, 4, 50, vec![0, 1, 2, 9, 10, 11, 18, 19, 20]),
            (64, 40, 100, vec![0, 5]),
            (17, 71, 37, vec![3]),
        ] {
            let cols = pad(n) + offsets.iter().max().unwrap();
            let xs = |r: usize, j: usize| round_bf16(noise(r * cols + j, 3));
            let mut b = PackedCols::new();
            let words = b.reset(k, cols);
            for r in 0..k.div_ceil(2) {
                for j in 0..cols {
                    let hi = if 2 * r + 1 < k { xs(2 * r + 1, j) } else { 0.0 };
                    words[r * cols + j] = pair(xs(2 * r, j), hi);
                }
            }
            let w = |t: usize, i: usize, r: usize| noise((t * m + i) * k + r, 4) * 0.5;
            let a = PackedRows::pack(offsets.len(), m, k, w);
            for (name, portable) in paths() {
                let mut c = Vec::new();
                on_path(portable, || conv_matmul(&a, &b, n, &offsets, &mut c));
                let got = |i: usize, j: usize| c[i * pad(n) + j];
                let want = |i: usize, j: usize| {
                    offsets.iter().enumerate().flat_map(move |(t, &o)| {
                        (0..k).map(move |r| round_bf16(w(t, i, r)) as f64 * xs(r, j + o) as f64)
                    })
                };
                check(name, (m, n), got, want);
            }
        }
    }

    /// Every element of a `rows × cols` result against the f64 sum of its products: the error
    /// relative to the sum of the products' magnitudes ≤ 1e-5.
    fn check<I: Iterator<Item = f64>>(
        name: &str,
        (rows, cols): (usize, usize),
        got: impl Fn(usize, usize) -> f32,
        want: impl Fn(usize, usize) -> I,
    ) {
        let mut worst = 0f64;
        for i in 0..rows {
            for j in 0..cols {
                let (s, mag) = want(i, j).fold((0f64, 0f64), |(s, m), p| (s + p, m + p.abs()));
                worst = worst.max((got(i, j) as f64 - s).abs() / mag.max(1e-30));
            }
        }
        assert!(
            worst <= 1e-5,
            "{name}: {rows}×{cols}: relative error {worst:e}"
        );
    }
}
