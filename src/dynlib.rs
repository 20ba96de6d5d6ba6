//! Opening a shared library at run time and looking up its symbols (`dlopen`/`dlsym`), so that
//! a library the machine may lack (the NVIDIA driver's `libcuda.so.1`) is not needed to start
//! the binary.
//!
//! glibc provides the three functions; they are declared here rather than taken from a crate.
//! A library opened here stays loaded until the process ends, so the addresses looked up in it
//! stay valid for as long as anything can hold them.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;

/// `RTLD_NOW` (glibc, every Linux architecture): resolve every symbol of the library at open,
/// so that a broken install fails there and not in the middle of a call.
const RTLD_NOW: c_int = 2;

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}

/// A shared library opened with `dlopen`; never closed.
#[derive(Debug)]
pub struct DynLib {
    handle: NonNull<c_void>,
    name: String,
}

// SAFETY: the handle is only passed to dlsym, which glibc documents as thread-safe (MT-Safe),
// and the library is never closed, so the handle stays valid on every thread.
unsafe impl Send for DynLib {}
// SAFETY: as for Send: shared use is only dlsym.
unsafe impl Sync for DynLib {}

impl DynLib {
    /// Opens the library `name` (a file name such as `"libcuda.so.1"`, searched for as the
    /// dynamic loader does, or a path), with every symbol resolved now and kept private to it
    /// (`RTLD_NOW | RTLD_LOCAL`). The error is the loader's own text (`dlerror`), which names
    /// the file and why it could not be loaded.
    pub fn open(name: &str) -> Result<DynLib, String> {
        let c_name = CString::new(name)
            .map_err(|_| format!("{name:?}: a library name cannot contain a NUL byte"))?;
        // SAFETY: c_name is a NUL-terminated string that outlives the call; dlopen has no other
        // preconditions. Running the library's initialisers is what loading it means.
        let handle = unsafe { dlopen(c_name.as_ptr(), RTLD_NOW) };
        match NonNull::new(handle) {
            Some(handle) => Ok(DynLib {
                handle,
                name: name.to_string(),
            }),
            None => Err(last_error().unwrap_or_else(|| format!("{name}: cannot be loaded"))),
        }
    }

    /// The name the library was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of `symbol` in this library (or the libraries it depends on). The caller
    /// gives it a type (a function pointer with the C signature the library documents) before
    /// using it.
    pub fn symbol(&self, symbol: &str) -> Result<NonNull<c_void>, String> {
        let c_symbol = CString::new(symbol)
            .map_err(|_| format!("{symbol:?}: a symbol name cannot contain a NUL byte"))?;
        // SAFETY: clears any earlier error so that the one read below belongs to this lookup;
        // dlerror has no preconditions.
        unsafe { dlerror() };
        // SAFETY: the handle came from dlopen and is never closed; c_symbol is NUL-terminated
        // and outlives the call.
        let address = unsafe { dlsym(self.handle.as_ptr(), c_symbol.as_ptr()) };
        NonNull::new(address).ok_or_else(|| {
            last_error().unwrap_or_else(|| format!("{}: {symbol} is a null symbol", self.name))
        })
    }
}

/// The loader's message for the last failed `dlopen`/`dlsym` on this thread, if any.
fn last_error() -> Option<String> {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by glibc that stays valid
    // until the next dl* call on this thread; it is copied out before any such call.
    unsafe {
        let message = dlerror();
        if message.is_null() {
            None
        } else {
            Some(CStr::from_ptr(message).to_string_lossy().into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_libc_function_and_calls_it() {
        let libc = DynLib::open("libc.so.6").unwrap();
        assert_eq!(libc.name(), "libc.so.6");
        let address = libc.symbol("strlen").unwrap();
        // SAFETY: strlen's C signature is size_t strlen(const char *).
        let strlen: unsafe extern "C" fn(*const c_char) -> usize =
            unsafe { std::mem::transmute(address.as_ptr()) };
        let text = CString::new("sun-assistant").unwrap();
        // SAFETY: text is NUL-terminated.
        assert_eq!(unsafe { strlen(text.as_ptr()) }, 13);
    }

    #[test]
    fn a_missing_library_or_symbol_is_an_error_naming_it() {
        let msg = DynLib::open("libsun-no-such-library.so.7").unwrap_err();
        assert!(msg.contains("libsun-no-such-library.so.7"), "{msg}");
        let libc = DynLib::open("libc.so.6").unwrap();
        let msg = libc.symbol("sun_no_such_symbol").unwrap_err();
        assert!(msg.contains("sun_no_such_symbol"), "{msg}");
        assert!(DynLib::open("bad\0name").is_err());
        assert!(libc.symbol("bad\0name").is_err());
    }
}
