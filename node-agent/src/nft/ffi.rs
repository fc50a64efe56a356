//! In-process libnftables: the library behind `nft`, so a per-pod change costs a netlink
//! transaction instead of a process spawn. One of the crate's three places with unsafe code (the
//! others are `sched` and `bypass::tcx_ingress_has_programs`), each block a C call or syscall
//! with its contract stated.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::ptr::NonNull;

#[repr(C)]
struct NftCtxRaw {
    _private: [u8; 0],
}

const NFT_CTX_DEFAULT: u32 = 0;
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

#[link(name = "nftables")]
extern "C" {
    fn nft_ctx_new(flags: u32) -> *mut NftCtxRaw;
    fn nft_ctx_free(ctx: *mut NftCtxRaw);
    fn nft_ctx_buffer_output(ctx: *mut NftCtxRaw) -> c_int;
    fn nft_ctx_buffer_error(ctx: *mut NftCtxRaw) -> c_int;
    fn nft_ctx_get_output_buffer(ctx: *mut NftCtxRaw) -> *const c_char;
    fn nft_ctx_get_error_buffer(ctx: *mut NftCtxRaw) -> *const c_char;
    fn nft_ctx_output_set_flags(ctx: *mut NftCtxRaw, flags: c_uint);
    fn nft_ctx_output_get_flags(ctx: *mut NftCtxRaw) -> c_uint;
    fn nft_run_cmd_from_buffer(ctx: *mut NftCtxRaw, buf: *const c_char) -> c_int;
}

/// An owned libnftables context with buffered output and error streams.
///
/// The context is not thread-safe; it is `Send` (moved into the one task that writes the
/// kernel) but not `Sync`.
pub struct NftContext {
    ctx: NonNull<NftCtxRaw>,
}

// SAFETY: a libnftables context has no thread affinity; it only must not be used from two
// threads at once, which `&mut self` on every call and the absence of `Sync` guarantee.
unsafe impl Send for NftContext {}

/// What one command buffer produced.
#[derive(Debug)]
pub struct NftOutput {
    pub ok: bool,
    pub output: String,
    pub error: String,
}

impl NftContext {
    /// Creates a context; `None` when libnftables cannot allocate one.
    pub fn new() -> Option<Self> {
        // SAFETY: nft_ctx_new has no preconditions; a null return is handled.
        let raw = unsafe { nft_ctx_new(NFT_CTX_DEFAULT) };
        let ctx = NonNull::new(raw)?;
        // SAFETY: ctx is a valid, exclusively owned context.
        unsafe {
            nft_ctx_buffer_output(ctx.as_ptr());
            nft_ctx_buffer_error(ctx.as_ptr());
        }
        Some(Self { ctx })
    }

    /// Runs a buffer of nft commands as one transaction. With `json`, listings are JSON.
    pub fn run(&mut self, commands: &str, json: bool) -> Result<NftOutput, std::ffi::NulError> {
        let c = CString::new(commands)?;
        let ptr = self.ctx.as_ptr();
        // SAFETY: ptr is a valid context owned by self (exclusive through &mut self); `c`
        // outlives the call; the buffers returned are owned by the context and copied out
        // before the next call can invalidate them.
        unsafe {
            let flags = nft_ctx_output_get_flags(ptr);
            let flags = if json {
                flags | NFT_CTX_OUTPUT_JSON
            } else {
                flags & !NFT_CTX_OUTPUT_JSON
            };
            nft_ctx_output_set_flags(ptr, flags);
            let rc = nft_run_cmd_from_buffer(ptr, c.as_ptr());
            let output = copy_buffer(nft_ctx_get_output_buffer(ptr));
            let error = copy_buffer(nft_ctx_get_error_buffer(ptr));
            Ok(NftOutput {
                ok: rc == 0,
                output,
                error,
            })
        }
    }
}

/// Copies a NUL-terminated buffer owned by libnftables.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the duration of the call.
unsafe fn copy_buffer(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Drop for NftContext {
    fn drop(&mut self) {
        // SAFETY: the context is valid and freed exactly once.
        unsafe { nft_ctx_free(self.ctx.as_ptr()) }
    }
}
