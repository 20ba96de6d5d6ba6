//! The CUDA driver, loaded at run time: the binary starts, and runs on the CPU, on a machine
//! without the NVIDIA driver.
//!
//! cust_raw declares the driver's functions (`cuInit`, `cuMemAlloc_v2`, ...) as `extern "C"`
//! and its build script links `-lcuda`. This module defines each of those the binary calls,
//! under the same name and with the same signature, as a forwarder to the function of that
//! name in `libcuda.so.1`, opened with `dlopen` on the first call. The linker resolves
//! cust_raw's references to these definitions, so nothing is left for libcuda to provide and
//! `--as-needed` (rustc's default) drops it from the binary's `DT_NEEDED`.
//!
//! Without the library every forwarder returns `CUDA_ERROR_NOT_INITIALIZED` (so `cuInit`
//! fails as on a machine with no GPU); a function the installed driver lacks returns
//! `CUDA_ERROR_NOT_FOUND`. [`require_driver`] says which, in words, before anything is tried.
//!
//! The table must name every `cu*` symbol the binary references: one left out is linked from
//! libcuda again, and the binary needs it to start. `.ci/cuda-check` fails in that case and
//! lists the names to add (`nm -D --undefined-only target/cuda/release/sun | grep ' cu'`).
//! The signatures are cust_raw's bindings (`src/cuda.rs`), argument for argument; the newer
//! functions (`cuTensorMapEncodeTiled`, `cuLaunchKernelEx`) follow cuda.h, as do the launch
//! configuration structs written down here for `cuLaunchKernelEx` ([`CUlaunchConfig`]).

use super::driver_results::result_from_code;
use crate::dynlib::DynLib;
use cust::sys::{
    cudaError_enum, CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUfunction,
    CUfunction_attribute, CUgraph, CUgraphExec, CUjit_option, CUmodule, CUresult, CUstream,
    CUstreamCaptureMode,
};
use std::ffi::{c_char, c_int, c_uchar, c_uint, c_ulonglong, c_void};
use std::sync::OnceLock;

/// The driver library's name, as the NVIDIA driver installs it.
pub(crate) const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// One line per forwarded function: `name(argument: type, ...);`, as in cust_raw.
macro_rules! driver_functions {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {
        /// The driver's functions, looked up in `libcuda.so.1`; `None` where it lacks one.
        /// Results are taken as plain integers (see [`super::driver_results`]).
        #[allow(non_snake_case)]
        struct DriverFunctions {
            $($name: Option<unsafe extern "C" fn($($ty),*) -> c_int>,)*
        }

        impl DriverFunctions {
            /// Looks every function up in `library`; also returns the names it lacks.
            fn look_up(library: &DynLib) -> (DriverFunctions, Vec<&'static str>) {
                let mut missing = Vec::new();
                let functions = DriverFunctions {
                    $($name: match library.symbol(stringify!($name)) {
                        // SAFETY: the driver exports this name as a C function with the
                        // signature cust_raw's bindings (generated from cuda.h) give it, which
                        // is the one written in this table; a data pointer and a function
                        // pointer have the same size and representation on Linux.
                        Ok(address) => Some(unsafe {
                            std::mem::transmute::<
                                *mut c_void,
                                unsafe extern "C" fn($($ty),*) -> c_int,
                            >(address.as_ptr())
                        }),
                        Err(_) => {
                            missing.push(stringify!($name));
                            None
                        }
                    },)*
                };
                (functions, missing)
            }
        }

        /// Every forwarded name, in table order.
        #[cfg(test)]
        const FORWARDED: &[&str] = &[$(stringify!($name)),*];

        $(
            /// Forwards to the driver's function of this name (see the module docs).
            ///
            /// # Safety
            /// The driver's own contract for this function.
            #[no_mangle]
            #[allow(non_snake_case)]
            pub(crate) unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
                match loaded().map(|driver| driver.functions.$name) {
                    // SAFETY: the pointer is the driver's function of this name and signature
                    // (see look_up); the caller upholds the driver's contract for it.
                    Ok(Some(function)) => result_from_code(unsafe { function($($arg),*) }),
                    Ok(None) => cudaError_enum::CUDA_ERROR_NOT_FOUND,
                    Err(_) => cudaError_enum::CUDA_ERROR_NOT_INITIALIZED,
                }
            }
        )*
    };
}

driver_functions! {
    cuCtxGetCurrent(pctx: *mut CUcontext);
    cuCtxSetCurrent(ctx: CUcontext);
    cuDeviceGet(device: *mut CUdevice, ordinal: c_int);
    cuDeviceGetAttribute(pi: *mut c_int, attrib: CUdevice_attribute, dev: CUdevice);
    cuDeviceGetCount(count: *mut c_int);
    cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice);
    cuDevicePrimaryCtxRelease_v2(dev: CUdevice);
    cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice);
    cuEventCreate(ph_event: *mut CUevent, flags: c_uint);
    cuEventDestroy_v2(h_event: CUevent);
    cuEventElapsedTime(milliseconds: *mut f32, h_start: CUevent, h_end: CUevent);
    cuEventRecord(h_event: CUevent, h_stream: CUstream);
    cuEventSynchronize(h_event: CUevent);
    cuGraphDestroy(h_graph: CUgraph);
    cuGraphExecDestroy(h_graph_exec: CUgraphExec);
    cuGraphInstantiateWithFlags(ph_graph_exec: *mut CUgraphExec, h_graph: CUgraph, flags: c_ulonglong);
    cuGraphLaunch(h_graph_exec: CUgraphExec, h_stream: CUstream);
    cuFuncGetAttribute(pi: *mut c_int, attrib: CUfunction_attribute, hfunc: CUfunction);
    cuFuncSetAttribute(hfunc: CUfunction, attrib: CUfunction_attribute, value: c_int);
    cuInit(flags: c_uint);
    cuLaunchKernel(f: CUfunction, grid_x: c_uint, grid_y: c_uint, grid_z: c_uint, block_x: c_uint, block_y: c_uint, block_z: c_uint, shared_mem_bytes: c_uint, h_stream: CUstream, kernel_params: *mut *mut c_void, extra: *mut *mut c_void);
    cuMemAllocManaged(dptr: *mut CUdeviceptr, bytesize: usize, flags: c_uint);
    cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize);
    cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize);
    cuMemFree_v2(dptr: CUdeviceptr);
    cuMemFreeHost(p: *mut c_void);
    cuMemGetInfo_v2(free: *mut usize, total: *mut usize);
    cuMemPrefetchAsync(dev_ptr: CUdeviceptr, count: usize, dst_device: CUdevice, h_stream: CUstream);
    cuMemcpyDtoH_v2(dst_host: *mut c_void, src_device: CUdeviceptr, byte_count: usize);
    cuMemcpyDtoHAsync_v2(dst_host: *mut c_void, src_device: CUdeviceptr, byte_count: usize, h_stream: CUstream);
    cuMemcpyHtoD_v2(dst_device: CUdeviceptr, src_host: *const c_void, byte_count: usize);
    cuMemcpyHtoDAsync_v2(dst_device: CUdeviceptr, src_host: *const c_void, byte_count: usize, h_stream: CUstream);
    cuMemsetD8_v2(dst_device: CUdeviceptr, uc: c_uchar, n: usize);
    cuModuleGetFunction(hfunc: *mut CUfunction, hmod: CUmodule, name: *const c_char);
    cuModuleLoadDataEx(module: *mut CUmodule, image: *const c_void, num_options: c_uint, options: *mut CUjit_option, option_values: *mut *mut c_void);
    cuModuleUnload(hmod: CUmodule);
    cuOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks: *mut c_int, func: CUfunction, block_size: c_int, dynamic_smem_size: usize);
    cuStreamBeginCapture_v2(h_stream: CUstream, mode: CUstreamCaptureMode);
    cuStreamCreateWithPriority(ph_stream: *mut CUstream, flags: c_uint, priority: c_int);
    cuStreamDestroy_v2(h_stream: CUstream);
    cuStreamEndCapture(h_stream: CUstream, ph_graph: *mut CUgraph);
    cuStreamSynchronize(h_stream: CUstream);
    // Not in cust_raw (CUDA 12.0+): cuda.h's signature, the tensor map as its 128 bytes and the
    // four enums (CUtensorMapDataType, ...Interleave, ...Swizzle, ...L2promotion,
    // ...FloatOOBfill) as the unsigned ints they are passed as (see gemm_sm90.rs for the values).
    cuTensorMapEncodeTiled(tensor_map: *mut c_void, data_type: c_uint, rank: c_uint, global_address: *mut c_void, global_dim: *const c_ulonglong, global_strides: *const c_ulonglong, box_dim: *const c_uint, element_strides: *const c_uint, interleave: c_uint, swizzle: c_uint, l2_promotion: c_uint, oob_fill: c_uint);
    cuStreamWaitEvent(h_stream: CUstream, h_event: CUevent, flags: c_uint);
    // Not in cust_raw (CUDA 12.0+): cuda.h's signature, the configuration as laid out below.
    cuLaunchKernelEx(config: *const CUlaunchConfig, f: CUfunction, kernel_params: *mut *mut c_void, extra: *mut *mut c_void);
}

/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` of cuda.h's `CUlaunchAttributeID`
/// (13.0): the launch may overlap the previous kernel of its stream, and resolves its dependency
/// on it with `griddepcontrol.wait` (programmatic dependent launch).
pub(crate) const CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: c_uint = 6;

/// cuda.h's `CUlaunchAttributeValue` (13.0): a union padded to 64 bytes, 8-byte aligned (its
/// members hold pointers). Only the member this crate sets is named:
/// `programmaticStreamSerializationAllowed`, an `int` at offset 0.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
#[allow(non_camel_case_types)]
pub(crate) struct CUlaunchAttributeValue {
    pub(crate) programmatic_stream_serialization_allowed: c_int,
    pub(crate) pad: [u8; 60],
}

/// cuda.h's `CUlaunchAttribute` (13.0): the attribute's id (a 4-byte enum), padding to 8
/// bytes, then its value.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(non_camel_case_types)]
pub(crate) struct CUlaunchAttribute {
    pub(crate) id: c_uint,
    pub(crate) pad: [u8; 4],
    pub(crate) value: CUlaunchAttributeValue,
}

/// cuda.h's `CUlaunchConfig` (13.0): the grid, the block, the dynamic shared memory, the
/// stream and the attributes of one `cuLaunchKernelEx` launch.
#[repr(C)]
#[allow(non_snake_case, non_camel_case_types)]
pub(crate) struct CUlaunchConfig {
    pub(crate) gridDimX: c_uint,
    pub(crate) gridDimY: c_uint,
    pub(crate) gridDimZ: c_uint,
    pub(crate) blockDimX: c_uint,
    pub(crate) blockDimY: c_uint,
    pub(crate) blockDimZ: c_uint,
    pub(crate) sharedMemBytes: c_uint,
    pub(crate) hStream: CUstream,
    /// Nullable when `numAttrs` is 0.
    pub(crate) attrs: *mut CUlaunchAttribute,
    pub(crate) numAttrs: c_uint,
}

/// The opened driver library and its functions.
struct Driver {
    /// Kept so the library is visibly owned; it is never closed.
    _library: DynLib,
    functions: DriverFunctions,
    /// Names of the table the library lacks.
    missing: Vec<&'static str>,
}

/// The driver, opened on first use; the error is the loader's text when it cannot be.
fn loaded() -> Result<&'static Driver, &'static str> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let library = DynLib::open(DRIVER_LIBRARY)?;
            let (functions, missing) = DriverFunctions::look_up(&library);
            Ok(Driver {
                _library: library,
                functions,
                missing,
            })
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Succeeds when `libcuda.so.1` loads and has every function this binary calls; otherwise
/// says, in words for the user, what is missing.
pub(crate) fn require_driver() -> Result<(), String> {
    match loaded() {
        Err(reason) => Err(format!(
            "no NVIDIA driver ({DRIVER_LIBRARY}) found: {reason}"
        )),
        Ok(driver) if !driver.missing.is_empty() => Err(format!(
            "the NVIDIA driver's {DRIVER_LIBRARY} lacks {}: it is older than this binary \
             needs; update the driver",
            driver.missing.join(", ")
        )),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_each_driver_function_once() {
        let mut names = FORWARDED.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FORWARDED.len(), "a name appears twice");
        assert!(FORWARDED.iter().all(|name| name.starts_with("cu")));
        assert!(FORWARDED.contains(&"cuInit"));
    }

    #[test]
    fn the_launch_structs_have_cuda_h_layouts() {
        use std::mem::{align_of, offset_of, size_of};
        // cuda.h 13.0: the value union is `char pad[64]` with pointer members; the attribute is
        // `id`, `char pad[8 - sizeof(id)]`, the value; the config is seven unsigned ints, then
        // the stream and attribute pointers and the attribute count (padded to 8).
        assert_eq!(
            (
                size_of::<CUlaunchAttributeValue>(),
                align_of::<CUlaunchAttributeValue>()
            ),
            (64, 8)
        );
        assert_eq!(
            offset_of!(
                CUlaunchAttributeValue,
                programmatic_stream_serialization_allowed
            ),
            0
        );
        assert_eq!(
            (
                size_of::<CUlaunchAttribute>(),
                align_of::<CUlaunchAttribute>()
            ),
            (72, 8)
        );
        assert_eq!(offset_of!(CUlaunchAttribute, id), 0);
        assert_eq!(offset_of!(CUlaunchAttribute, value), 8);
        assert_eq!(
            (size_of::<CUlaunchConfig>(), align_of::<CUlaunchConfig>()),
            (56, 8)
        );
        assert_eq!(offset_of!(CUlaunchConfig, gridDimX), 0);
        assert_eq!(offset_of!(CUlaunchConfig, blockDimX), 12);
        assert_eq!(offset_of!(CUlaunchConfig, sharedMemBytes), 24);
        assert_eq!(offset_of!(CUlaunchConfig, hStream), 32);
        assert_eq!(offset_of!(CUlaunchConfig, attrs), 40);
        assert_eq!(offset_of!(CUlaunchConfig, numAttrs), 48);
        assert!(FORWARDED.contains(&"cuLaunchKernelEx"));
    }

    /// Here (CI, the development machine) there is no driver, or the link stub of
    /// `.ci/cuda-check` when it is on the library path; on a GPU machine, the real one.
    #[test]
    fn without_a_driver_every_call_fails_cleanly() {
        match require_driver() {
            Err(reason) if loaded().is_err() => {
                assert!(
                    reason.starts_with("no NVIDIA driver (libcuda.so.1) found: "),
                    "{reason}"
                );
                assert!(reason.contains("libcuda.so.1"), "{reason}");
                // SAFETY: cuInit takes a flags word that must be 0.
                let init = unsafe { cust::sys::cuInit(0) };
                assert_eq!(init, cudaError_enum::CUDA_ERROR_NOT_INITIALIZED);
                let mut count = -1;
                // SAFETY: count is a valid place for the driver to write the device count.
                let counted = unsafe { cust::sys::cuDeviceGetCount(&mut count) };
                assert_eq!(counted, cudaError_enum::CUDA_ERROR_NOT_INITIALIZED);
                assert_eq!(count, -1, "nothing was written");
            }
            Err(reason) => eprintln!("driver loaded but incomplete: {reason}"),
            Ok(()) => eprintln!("skipped: a libcuda.so.1 is present"),
        }
    }
}
