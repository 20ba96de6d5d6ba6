//! The fused kernels of a batch-1 decode step (one row, t = 1): the RMSNorm with the LoRA A
//! products that read its output ([`rmsnorm_lora_a`], `ptx/decode.cu`), and the tensor-core
//! 4-bit GEMV with per-row epilogues ([`gemv4_rows`], [`gemv4_residual`], [`gemv4_swiglu`],
//! `gemv4_mma_fused_*` in `ptx/nf4.cu`): the LoRA B product, the residual add, SwiGLU.
//! Whether a matrix can go through them: [`fused_gemv_fits`].

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::launch_checks::{check_len, to_i64};
use super::nf4::{opt_in_dynamic_limit, GpuAbsmax, MMA_ROWS, PAIR_TABLE_BYTES, THREADS_PER_CTA};
use super::pdl::{launch_step, step_kernel};
use super::Gpu4bit;
use crate::error::{Error, Result};
use cust::memory::DeviceCopy;

/// Threads per CTA of `rmsnorm_lora_a_bf16` (`DECODE_THREADS`) and A rows per CTA (a warp each).
const NORM_THREADS: u32 = 256;
const A_ROWS_PER_CTA: usize = NORM_THREADS as usize / 32;
/// LoRA A factors one norm launch takes (the kernel's three pointers).
const MAX_FACTORS: usize = 3;
/// Matrices one fused GEMV launch takes (`FUSED_MAX_MATRICES`).
const MAX_MATRICES: usize = 3;
/// Dynamic shared memory a launch may use without opting in (48 KiB less the norm kernel's
/// 128 bytes of static shared memory, rounded down).
const NORM_SHARED_LIMIT: usize = 48 * 1024 - 256;
/// The fused GEMV's modes (`FUSED_ROWS`, `FUSED_RESIDUAL`, `FUSED_SWIGLU`).
const MODE_ROWS: i32 = 0;
const MODE_RESIDUAL: i32 = 1;
const MODE_SWIGLU: i32 = 2;

/// A LoRA adapter's term in a fused GEMV's epilogue: `scale · B[row, :] · z` added to row
/// `row` before it is rounded.
#[derive(Clone, Copy)]
pub struct LoraTerm<'a> {
    /// B (rows, rank) bf16.
    pub b: &'a GpuBuffer<u16>,
    /// Holds z (rank,) bf16 at `z_offset` (the norm kernel writes several adapters' z into
    /// one buffer).
    pub z: &'a GpuBuffer<u16>,
    /// Where this adapter's z starts in `z`.
    pub z_offset: usize,
    /// The adapter's rank r >= 1.
    pub rank: usize,
    /// The adapter's scale (alpha / r).
    pub scale: f32,
}

/// One matrix of a fused GEMV: W (rows, cols) 4-bit, and its adapter's term if any.
#[derive(Clone, Copy)]
pub struct FusedProduct<'a> {
    /// The 4-bit weight, viewed as row-major (rows, cols).
    pub weight: &'a Gpu4bit,
    /// Rows of W (its output features).
    pub rows: usize,
    /// The adapter's B product, or none.
    pub lora: Option<LoraTerm<'a>>,
}

/// `FusedMatrix` in ptx/nf4.cu: every pointer a device address, 80 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FusedMatrix {
    packed: u64,
    absmax: u64,
    nested: u64,
    dyn_map: u64,
    lora_b: u64,
    lora_z: u64,
    out: u64,
    rows: i64,
    lora_rank: i32,
    lora_scale: f32,
    offset: f32,
    nested_shift: i32,
}

/// `FusedGemvArgs` in ptx/nf4.cu, passed by value: 312 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FusedGemvArgs {
    matrix: [FusedMatrix; MAX_MATRICES],
    table: u64,
    x: u64,
    residual: u64,
    residual_out: u64,
    cols: i64,
    blocksize: i64,
    count: i32,
    mode: i32,
    first_cta: [i32; MAX_MATRICES + 1],
}

const _: () = assert!(std::mem::size_of::<FusedMatrix>() == 80);
const _: () = assert!(std::mem::size_of::<FusedGemvArgs>() == 312);

// SAFETY: plain old data (integers and floats, no references): a bitwise copy is what the
// kernel receives as its parameter.
unsafe impl DeviceCopy for FusedGemvArgs {}

/// Whether W (rows, cols) can go through the fused GEMV: whole 32-element chunks per row, a
/// power-of-two block size (and nested block size), fewer than 2^32 chunks, fewer than 2^31
/// columns and rows, and the pair table plus x within the GPU's shared memory per CTA.
pub fn fused_gemv_fits(
    device: &CudaDevice,
    weight: &Gpu4bit,
    (rows, cols): (usize, usize),
) -> bool {
    rows.checked_mul(cols) == Some(weight.numel)
        && rows > 0
        && i32::try_from(cols).is_ok()
        && i32::try_from(rows).is_ok()
        && weight.gemv_fast_path_fits((rows, cols))
        && matches!(shared_bytes(device, weight, cols), Ok(Some(_)))
}

/// The fused GEMV's dynamic shared memory for `cols` columns (the pair table, then x), or
/// `None` when it exceeds what the kernel may use; opts the kernel (and its PDL twin, a function
/// of its own) in on first use.
fn shared_bytes(device: &CudaDevice, weight: &Gpu4bit, cols: usize) -> Result<Option<usize>> {
    let limit = match weight.fused_shared_limit.get() {
        Some(limit) => *limit,
        None => {
            let name = kernel_name(weight);
            let mut limit = opt_in_dynamic_limit(device, &device.function("nf4", name)?)?;
            if device.has_module("nf4_pdl") {
                let twin = device.function("nf4_pdl", name)?;
                limit = limit.min(opt_in_dynamic_limit(device, &twin)?);
            }
            *weight.fused_shared_limit.get_or_init(|| limit)
        }
    };
    let bytes = PAIR_TABLE_BYTES + (cols * 2).next_multiple_of(16);
    Ok((bytes <= limit).then_some(bytes))
}

fn kernel_name(weight: &Gpu4bit) -> &'static str {
    match weight.absmax {
        GpuAbsmax::Plain(_) => "gemv4_mma_fused_plain_bf16",
        GpuAbsmax::Double { .. } => "gemv4_mma_fused_double_bf16",
    }
}

/// Queues `y_i (rows_i,) bf16 = W_i x + scale_i · B_i z_i` for up to three matrices of the
/// same width (q, k and v) in one launch: `products[i]` writes `outs[i]`.
pub fn gemv4_rows(
    device: &CudaDevice,
    products: &[FusedProduct<'_>],
    x: &GpuBuffer<u16>,
    outs: &mut [&mut GpuBuffer<u16>],
) -> Result<()> {
    if products.is_empty() || products.len() > MAX_MATRICES || outs.len() != products.len() {
        return Err(Error::invalid(format!(
            "fused gemv: {} matrices and {} outputs (1 to 3 of each, as many outputs as matrices)",
            products.len(),
            outs.len()
        )));
    }
    let mut args = base_args(device, products, x)?;
    args.mode = MODE_ROWS;
    let mut ctas = 0usize;
    for (i, (product, out)) in products.iter().zip(outs.iter_mut()).enumerate() {
        check_len("fused gemv output", out.len(), product.rows)?;
        args.matrix[i].out = out.device_ptr().as_raw();
        args.first_cta[i] = grid_i32(ctas)?;
        ctas += product.rows.div_ceil(MMA_ROWS);
    }
    args.first_cta[products.len()] = grid_i32(ctas)?;
    launch_fused(device, products[0].weight, &args, ctas, x.len())
}

/// Queues the product of a block's last linear and the residual add after it: `y (rows,) f32 =
/// residual + bf16(W x + scale · B z)`, `y_bf16 = bf16(y)` (`y` must be another buffer than
/// `residual`, which the borrows ensure).
pub fn gemv4_residual(
    device: &CudaDevice,
    product: &FusedProduct<'_>,
    x: &GpuBuffer<u16>,
    residual: &GpuBuffer<f32>,
    (y, y_bf16): (&mut GpuBuffer<f32>, &mut GpuBuffer<u16>),
) -> Result<()> {
    let products = [*product];
    let mut args = base_args(device, &products, x)?;
    check_len("fused gemv residual", residual.len(), product.rows)?;
    check_len("fused gemv residual output", y.len(), product.rows)?;
    check_len(
        "fused gemv residual bf16 output",
        y_bf16.len(),
        product.rows,
    )?;
    args.mode = MODE_RESIDUAL;
    args.residual = residual.device_ptr().as_raw();
    args.residual_out = y.device_ptr().as_raw();
    args.matrix[0].out = y_bf16.device_ptr().as_raw();
    let ctas = product.rows.div_ceil(MMA_ROWS);
    args.first_cta[1] = grid_i32(ctas)?;
    launch_fused(device, product.weight, &args, ctas, x.len())
}

/// Queues the MLP's gate and up products with SwiGLU: `hidden (F,) bf16 = silu(g) · u` with
/// `g = bf16(W_gate x + ...)` and `u = bf16(W_up x + ...)` (swiglu_forward's expression); rows
/// j of gate and up are computed by the same CTA.
pub fn gemv4_swiglu(
    device: &CudaDevice,
    (gate, up): (&FusedProduct<'_>, &FusedProduct<'_>),
    x: &GpuBuffer<u16>,
    hidden: &mut GpuBuffer<u16>,
) -> Result<()> {
    if gate.rows != up.rows {
        return Err(Error::invalid(format!(
            "fused gate/up gemv: gate has {} rows and up {}",
            gate.rows, up.rows
        )));
    }
    let products = [*gate, *up];
    let mut args = base_args(device, &products, x)?;
    check_len("fused SwiGLU output", hidden.len(), gate.rows)?;
    args.mode = MODE_SWIGLU;
    args.matrix[0].out = hidden.device_ptr().as_raw();
    let ctas = gate.rows.div_ceil(MMA_ROWS / 2);
    launch_fused(device, gate.weight, &args, ctas, x.len())
}

/// The arguments every mode shares, after checking that the matrices fit the kernel, share x's
/// width, the code table, the block size and the kind of scales, and that each adapter's B and
/// z are as long as its rank says.
fn base_args(
    device: &CudaDevice,
    products: &[FusedProduct<'_>],
    x: &GpuBuffer<u16>,
) -> Result<FusedGemvArgs> {
    let cols = x.len();
    let first = products[0].weight;
    let mut args = FusedGemvArgs {
        table: first.code_table.device_ptr().as_raw(),
        x: x.device_ptr().as_raw(),
        cols: to_i64(cols, "fused gemv columns")?,
        blocksize: to_i64(first.blocksize, "blocksize")?,
        count: products.len() as i32, // at most MAX_MATRICES (the callers' checks)
        ..FusedGemvArgs::default()
    };
    for (i, product) in products.iter().enumerate() {
        let weight = product.weight;
        if !fused_gemv_fits(device, weight, (product.rows, cols)) {
            return Err(Error::invalid(format!(
                "fused gemv: a {} x {cols} product of a 4-bit tensor of {} elements does not fit \
                 the fused kernel (use Gpu4bit::gemv_bf16)",
                product.rows, weight.numel
            )));
        }
        let same_kind = matches!(
            (&weight.absmax, &first.absmax),
            (GpuAbsmax::Plain(_), GpuAbsmax::Plain(_))
                | (GpuAbsmax::Double { .. }, GpuAbsmax::Double { .. })
        );
        if weight.table_values != first.table_values
            || weight.blocksize != first.blocksize
            || !same_kind
        {
            return Err(Error::invalid(
                "fused gemv: the matrices of one launch need the same code table, block size \
                 and kind of scales",
            ));
        }
        let m = &mut args.matrix[i];
        m.packed = weight.packed.device_ptr().as_raw();
        m.rows = to_i64(product.rows, "fused gemv rows")?;
        match &weight.absmax {
            GpuAbsmax::Plain(absmax) => m.absmax = absmax.device_ptr().as_raw(),
            GpuAbsmax::Double {
                codes,
                dynamic_map,
                nested,
                offset,
                nested_blocksize,
            } => {
                m.absmax = codes.device_ptr().as_raw();
                m.dyn_map = dynamic_map.device_ptr().as_raw();
                m.nested = nested.device_ptr().as_raw();
                m.offset = *offset;
                // a power of two (fused_gemv_fits): its log2
                m.nested_shift = nested_blocksize.trailing_zeros() as i32;
            }
        }
        if let Some(lora) = product.lora {
            let rank = i32::try_from(lora.rank)
                .ok()
                .filter(|&r| r > 0)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "fused gemv: LoRA rank {} (1 to 2^31 - 1)",
                        lora.rank
                    ))
                })?;
            check_len("fused gemv LoRA B", lora.b.len(), product.rows * lora.rank)?;
            if lora.z_offset + lora.rank > lora.z.len() {
                return Err(Error::invalid(format!(
                    "fused gemv: LoRA z of rank {} at {} past a buffer of {}",
                    lora.rank,
                    lora.z_offset,
                    lora.z.len()
                )));
            }
            m.lora_b = lora.b.device_ptr().as_raw();
            m.lora_z = lora.z.device_ptr().as_raw() + 2 * lora.z_offset as u64;
            m.lora_rank = rank;
            m.lora_scale = lora.scale;
        }
    }
    Ok(args)
}

fn grid_i32(ctas: usize) -> Result<i32> {
    i32::try_from(ctas).map_err(|_| {
        Error::invalid(format!(
            "fused gemv: {ctas} CTAs are too many for one launch"
        ))
    })
}

/// Launches the fused GEMV (the kernel for `weight`'s kind of scales) over `ctas` CTAs.
fn launch_fused(
    device: &CudaDevice,
    weight: &Gpu4bit,
    args: &FusedGemvArgs,
    ctas: usize,
    cols: usize,
) -> Result<()> {
    let shared = shared_bytes(device, weight, cols)?
        .ok_or_else(|| Error::invalid("fused gemv: x does not fit shared memory"))?;
    let name = kernel_name(weight);
    let kernel = step_kernel(device, "nf4", name)?;
    let grid = u32::try_from(ctas.max(1)).map_err(|_| Error::invalid("fused gemv: grid"))?;
    let shared = u32::try_from(shared).map_err(|_| Error::invalid("fused gemv: shared memory"))?;
    let args = *args;
    // SAFETY: FusedGemvArgs has the layout of the kernel's only parameter (sizes asserted on
    // both sides); base_args checked every matrix against the kernel's conditions (which it
    // re-checks, writing nothing otherwise), its packed codes and scales cover rows x cols
    // (validated at upload and by fused_gemv_fits), each adapter's B holds rows x rank and z
    // rank values from its offset, x holds cols (the width every matrix was checked with) and
    // every output its rows (the callers' checks); the grid is what the mode's mapping needs
    // and the dynamic shared memory (pair table and x) is within the limit set on the kernel.
    unsafe {
        launch_step!(kernel<<<grid, THREADS_PER_CTA, shared>>>(args), || format!(
            "launching {name} ({ctas} CTAs, {cols} columns)"
        ))
    }
}

/// Whether a row of `width` fits [`rmsnorm_lora_a`] (its shared memory holds the normalized row).
pub fn rmsnorm_lora_a_fits(width: usize) -> bool {
    width > 0 && (width * 2).next_multiple_of(16) <= NORM_SHARED_LIMIT
}

/// Queues the decode step's norm with the LoRA A products that read its output: `xhat (C,)
/// bf16 = rmsnorm(x) · weight` (bit for bit [`super::norm::rmsnorm_forward`]) and, for the
/// factors `(A_i (r_i, C) bf16, r_i)` given, `z = xhat [A_0; A_1; A_2]ᵀ` into `z[..Σ r_i]`.
/// With no factors, the norm alone.
pub fn rmsnorm_lora_a(
    device: &CudaDevice,
    x: &GpuBuffer<u16>,
    weight: &GpuBuffer<f32>,
    eps: f32,
    factors: &[(&GpuBuffer<u16>, usize)],
    (xhat, z): (&mut GpuBuffer<u16>, &mut GpuBuffer<u16>),
) -> Result<()> {
    let width = weight.len();
    check_len("rmsnorm + LoRA A input", x.len(), width)?;
    check_len("rmsnorm + LoRA A output", xhat.len(), width)?;
    if factors.len() > MAX_FACTORS {
        return Err(Error::invalid(format!(
            "rmsnorm + LoRA A: {} factors (at most {MAX_FACTORS})",
            factors.len()
        )));
    }
    let shared = (width * 2).next_multiple_of(16);
    if !rmsnorm_lora_a_fits(width) {
        return Err(Error::invalid(format!(
            "rmsnorm + LoRA A: a row of {width} does not fit the kernel's shared memory"
        )));
    }
    let mut pointers = [xhat.device_ptr().as_raw(); MAX_FACTORS]; // unused where r = 0
    let mut ranks = [0i64; MAX_FACTORS];
    for (i, &(a, rank)) in factors.iter().enumerate() {
        check_len("LoRA A", a.len(), rank * width)?;
        pointers[i] = a.device_ptr().as_raw();
        ranks[i] = to_i64(rank, "LoRA rank")?;
    }
    let total: usize = factors.iter().map(|&(_, r)| r).sum();
    if z.len() < total {
        return Err(Error::invalid(format!(
            "rmsnorm + LoRA A: z holds {} values, the factors have {total} rows",
            z.len()
        )));
    }
    let grid = u32::try_from(total.div_ceil(A_ROWS_PER_CTA).max(1))
        .map_err(|_| Error::invalid(format!("rmsnorm + LoRA A: {total} rows are too many")))?;
    let width_i = to_i64(width, "width")?;
    let kernel = step_kernel(device, "decode", "rmsnorm_lora_a_bf16")?;
    let (x, weight) = (x.device_ptr().as_raw(), weight.device_ptr().as_raw());
    let (xhat, z) = (xhat.device_ptr().as_raw(), z.device_ptr().as_raw());
    let [a0, a1, a2] = pointers;
    let [r0, r1, r2] = ranks;
    let shared = shared as u32; // at most NORM_SHARED_LIMIT
                                // SAFETY: the arguments match rmsnorm_lora_a_bf16 in ptx/decode.cu (device addresses as
                                // u64, the size of its pointers); x, weight and xhat hold width values, each A_i r_i x width
                                // (r_i = 0: never read), z at least r0 + r1 + r2 (checked above); xhat and z are borrowed
                                // mutably, so they alias no input; 256 threads, one warp per A row, and the normalized row's
                                // dynamic shared memory within the default limit.
    unsafe {
        launch_step!(
            kernel<<<grid, NORM_THREADS, shared>>>(
                x, weight, width_i, eps, a0, a1, a2, r0, r1, r2, xhat, z
            ),
            || format!("launching rmsnorm + LoRA A ({width} wide, {total} A rows)")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_block_has_the_kernels_offsets() {
        // Offsets of FusedGemvArgs in ptx/nf4.cu (static_assert'ed there as 312 bytes).
        let args = FusedGemvArgs::default();
        let base = &args as *const _ as usize;
        let at = |p: *const u8| p as usize - base;
        assert_eq!(at(&args.table as *const _ as *const u8), 240);
        assert_eq!(at(&args.cols as *const _ as *const u8), 272);
        assert_eq!(at(&args.count as *const _ as *const u8), 288);
        assert_eq!(at(&args.first_cta as *const _ as *const u8), 296);
        let m = FusedMatrix::default();
        let base = &m as *const _ as usize;
        assert_eq!(&m.rows as *const _ as usize - base, 56);
        assert_eq!(&m.nested_shift as *const _ as usize - base, 76);
    }
}
