//! NCCL, loaded at run time: summing device buffers across the GPUs of a data-parallel run.
//!
//! `libnccl.so.2` is opened with `dlopen` on first use (the binary does not need it to start):
//! the path in `SUN_NCCL_LIBRARY` when set, else the name through the loader's search path
//! (`LD_LIBRARY_PATH`; a PyTorch environment has it in `nvidia/nccl/lib` of the
//! `nvidia-nccl-cu12`/`-cu13` package). The C types are declared here from `nccl.h`: the
//! unique id is a struct of 128 bytes passed by value, a communicator an opaque pointer, data
//! types and reduction ops plain ints, every call returns an `ncclResult_t` (0 is success).
//!
//! NVLink multicast (NVLS) stays off: `NCCL_NVLS_ENABLE=0` is put in the environment before the
//! library is loaded, unless the user set it.

use super::{CudaDevice, GpuBuffer};
use crate::dynlib::DynLib;
use crate::error::{Error, Result};
use cust::memory::DeviceCopy;
use cust::sys::CUstream;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// The library's name when `SUN_NCCL_LIBRARY` is not set.
pub const NCCL_LIBRARY: &str = "libnccl.so.2";

/// `NCCL_UNIQUE_ID_BYTES`.
const UNIQUE_ID_BYTES: usize = 128;
/// `ncclDataType_t` values.
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
/// `ncclRedOp_t` `ncclSum`.
const NCCL_SUM: c_int = 0;

/// `ncclUniqueId`: `typedef struct { char internal[128]; } ncclUniqueId;`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId {
    internal: [u8; UNIQUE_ID_BYTES],
}

/// `ncclComm_t`: `struct ncclComm*`, opaque.
type RawComm = *mut c_void;
/// `ncclResult_t`.
type NcclResult = c_int;

/// The functions this module calls, with `nccl.h`'s signatures.
struct Functions {
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut RawUniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, RawUniqueId, c_int) -> NcclResult,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        CUstream,
    ) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

/// The opened library.
struct Library {
    /// Kept so the library is visibly owned; it is never closed.
    _library: DynLib,
    functions: Functions,
}

/// Looks `name` up in `library` as a function of type `F`.
///
/// # Safety
/// `F` must be the C signature the library gives `name`.
unsafe fn function<F: Copy>(library: &DynLib, name: &str) -> std::result::Result<F, String> {
    let address = library.symbol(name)?;
    debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the caller vouches that F is the function's signature; a data pointer and a
    // function pointer have the same size and representation on Linux.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address.as_ptr()) })
}

impl Library {
    fn open() -> std::result::Result<Library, String> {
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            // Read by NCCL when it initialises; set before anything of it is loaded.
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let name = std::env::var("SUN_NCCL_LIBRARY").unwrap_or_else(|_| NCCL_LIBRARY.to_string());
        let library = DynLib::open(&name)?;
        // SAFETY: each type below is the function's prototype in nccl.h (NCCL 2.x):
        // ncclGetVersion(int*), ncclGetUniqueId(ncclUniqueId*), ncclCommInitRank(ncclComm_t*,
        // int nranks, ncclUniqueId, int rank), ncclAllReduce(const void*, void*, size_t,
        // ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t), ncclGroupStart(void),
        // ncclGroupEnd(void), ncclCommDestroy(ncclComm_t), const char*
        // ncclGetErrorString(ncclResult_t); enums are ints.
        let functions = unsafe {
            Functions {
                get_version: function(&library, "ncclGetVersion")?,
                get_unique_id: function(&library, "ncclGetUniqueId")?,
                comm_init_rank: function(&library, "ncclCommInitRank")?,
                all_reduce: function(&library, "ncclAllReduce")?,
                group_start: function(&library, "ncclGroupStart")?,
                group_end: function(&library, "ncclGroupEnd")?,
                comm_destroy: function(&library, "ncclCommDestroy")?,
                get_error_string: function(&library, "ncclGetErrorString")?,
            }
        };
        Ok(Library {
            _library: library,
            functions,
        })
    }

    /// `Ok` for `ncclSuccess`, else an error naming `call` and NCCL's text for the code.
    fn check(&self, result: NcclResult, call: &str) -> Result<()> {
        if result == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString takes any result code and returns a static NUL-terminated
        // string (or null, handled).
        let text = unsafe {
            let text = (self.functions.get_error_string)(result);
            if text.is_null() {
                "no description".to_string()
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            }
        };
        Err(Error::Device(format!(
            "{call} failed: NCCL error {result} ({text}); NCCL_DEBUG=WARN in the environment \
             makes NCCL say more"
        )))
    }
}

/// NCCL, opened once per process.
fn library() -> Result<&'static Library> {
    static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(Library::open)
        .as_ref()
        .map_err(|reason| {
            Error::Device(format!(
                "NCCL ({}) cannot be loaded: {reason}; install it (e.g. pip install \
             nvidia-nccl-cu12) and point SUN_NCCL_LIBRARY at its lib/libnccl.so.2, or add that \
             folder to LD_LIBRARY_PATH",
                std::env::var("SUN_NCCL_LIBRARY").unwrap_or_else(|_| NCCL_LIBRARY.to_string())
            ))
        })
}

/// The loaded NCCL's version, e.g. "2.21.5".
pub fn nccl_version() -> Result<String> {
    let lib = library()?;
    let mut code: c_int = 0;
    // SAFETY: code is a valid place for an int.
    lib.check(
        unsafe { (lib.functions.get_version)(&mut code) },
        "ncclGetVersion",
    )?;
    // NCCL_VERSION(X,Y,Z): X*10000 + Y*100 + Z from 2.9 on, X*1000 + Y*100 + Z before.
    let (major, rest) = if code >= 10000 {
        (code / 10000, code % 10000)
    } else {
        (code / 1000, code % 1000)
    };
    Ok(format!("{major}.{}.{}", rest / 100, rest % 100))
}

/// A new unique id for a group (rank 0 makes it and hands it to the others).
pub fn nccl_unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    let lib = library()?;
    let mut id = RawUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: id is a valid, writable ncclUniqueId.
    lib.check(
        unsafe { (lib.functions.get_unique_id)(&mut id) },
        "ncclGetUniqueId",
    )?;
    Ok(id.internal)
}

/// One rank's NCCL communicator on its GPU; reductions run on the device's stream.
pub struct Nccl<'d> {
    comm: RawComm,
    device: &'d CudaDevice,
    rank: usize,
    world_size: usize,
    lib: &'static Library,
}

impl<'d> Nccl<'d> {
    /// Joins the group `unique_id` as `rank` of `world_size` on `device` (whose context is
    /// current on this thread). Returns when every rank has joined: NCCL has no timeout here,
    /// so a rank that never comes leaves the others waiting (the rendezvous before it has one).
    pub fn init(
        device: &'d CudaDevice,
        rank: usize,
        world_size: usize,
        unique_id: [u8; UNIQUE_ID_BYTES],
    ) -> Result<Self> {
        let lib = library()?;
        let (Ok(nranks), Ok(rank_c)) = (c_int::try_from(world_size), c_int::try_from(rank)) else {
            return Err(Error::invalid(format!(
                "rank {rank} of {world_size}: too many ranks for NCCL"
            )));
        };
        if rank >= world_size {
            return Err(Error::invalid(format!(
                "rank {rank} is not below the world size {world_size}"
            )));
        }
        let mut comm: RawComm = std::ptr::null_mut();
        let id = RawUniqueId {
            internal: unique_id,
        };
        // SAFETY: comm is a valid place for the handle; the id is passed by value as nccl.h
        // declares. The device's context is its primary context (cust's Context::new retains
        // it), current on this thread: the one the CUDA runtime inside NCCL uses for this GPU,
        // so NCCL's buffers and ours share an address space.
        let result = unsafe { (lib.functions.comm_init_rank)(&mut comm, nranks, id, rank_c) };
        lib.check(
            result,
            &format!(
                "ncclCommInitRank (rank {rank} of {world_size} on {})",
                device.name()
            ),
        )?;
        if comm.is_null() {
            return Err(Error::Device(
                "ncclCommInitRank returned no communicator".into(),
            ));
        }
        Ok(Nccl {
            comm,
            device,
            rank,
            world_size,
            lib,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The GPU this rank reduces on.
    pub fn device(&self) -> &'d CudaDevice {
        self.device
    }

    /// Queues the in-place sum of `buffer` across ranks on the device's stream.
    fn queue_all_reduce<T: DeviceCopy>(
        &self,
        buffer: &mut GpuBuffer<T>,
        data_type: c_int,
    ) -> Result<()> {
        let pointer = buffer.device_ptr().as_raw() as *mut c_void;
        // SAFETY: the buffer holds buffer.len() elements of the named type on this rank's
        // device and is borrowed mutably for the call; the reduction is queued on the device's
        // stream, so every later use of the buffer (on that stream, or after a synchronize) sees
        // the sum. Send and receive buffers may be the same (in place).
        let result = unsafe {
            (self.lib.functions.all_reduce)(
                pointer,
                pointer,
                buffer.len(),
                data_type,
                NCCL_SUM,
                self.comm,
                self.device.stream().as_inner(),
            )
        };
        self.lib.check(result, "ncclAllReduce")
    }

    /// Sums `buffer` across ranks, in place, on the device's stream.
    pub fn all_reduce_sum_f32(&self, buffer: &mut GpuBuffer<f32>) -> Result<()> {
        self.queue_all_reduce(buffer, NCCL_FLOAT32)
    }

    /// Sums every buffer of `buffers` across ranks, in place, as one NCCL group (one launch).
    pub fn all_reduce_sum_f32_many(&self, buffers: &mut [&mut GpuBuffer<f32>]) -> Result<()> {
        // SAFETY: ncclGroupStart takes no arguments.
        self.lib.check(
            unsafe { (self.lib.functions.group_start)() },
            "ncclGroupStart",
        )?;
        let queued = buffers
            .iter_mut()
            .try_for_each(|b| self.queue_all_reduce(b, NCCL_FLOAT32));
        // The group is closed even when a call in it failed.
        // SAFETY: ncclGroupEnd takes no arguments and matches the ncclGroupStart above.
        let ended = self
            .lib
            .check(unsafe { (self.lib.functions.group_end)() }, "ncclGroupEnd");
        queued.and(ended)
    }

    /// Sums `buffer` (a few f64 such as a loss sum) across ranks, in place.
    pub fn all_reduce_sum_f64(&self, buffer: &mut GpuBuffer<f64>) -> Result<()> {
        self.queue_all_reduce(buffer, NCCL_FLOAT64)
    }
}

impl Drop for Nccl<'_> {
    fn drop(&mut self) {
        // Queued reductions finish before the communicator goes; a failure here has nowhere to
        // go but stderr.
        if let Err(e) = self.device.synchronize() {
            eprintln!("warning: before destroying the NCCL communicator: {e}");
        }
        // SAFETY: comm came from ncclCommInitRank and is destroyed once, here.
        let result = unsafe { (self.lib.functions.comm_destroy)(self.comm) };
        if let Err(e) = self.lib.check(result, "ncclCommDestroy") {
            eprintln!("warning: {e}");
        }
    }
}

impl std::fmt::Debug for Nccl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device.name())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NCCL (CI, the development machine) the error names the library and how to
    /// point at one; with it (`SUN_NCCL_LIBRARY` or the loader's path) the version, NCCL's
    /// error text and the NVLink-multicast default are checked. Neither needs a GPU.
    #[test]
    fn loads_nccl_or_says_how_to_get_it() {
        match nccl_version() {
            Ok(version) => {
                assert!(version.starts_with("2."), "{version}");
                let lib = library().unwrap();
                let msg = lib.check(1, "ncclAllReduce").unwrap_err().to_string();
                assert!(
                    msg.starts_with("device: ncclAllReduce failed: NCCL error 1 ("),
                    "{msg}"
                );
                assert!(msg.to_lowercase().contains("cuda"), "{msg}");
                assert!(lib.check(0, "ncclGroupEnd").is_ok());
                assert!(std::env::var_os("NCCL_NVLS_ENABLE").is_some());
                eprintln!("NCCL {version} loaded");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("cannot be loaded"), "{msg}");
                assert!(msg.contains("SUN_NCCL_LIBRARY"), "{msg}");
                eprintln!("skipped: no NCCL ({msg})");
            }
        }
    }
}
