//! nftables through `libnftables.so.1`, the library the `nft` program is a front end of
//! (the nftables package installs both), loaded with `dlopen` and one context kept for the
//! daemon's life. Why not `nft -f -` each time: it cost 16–19 ms on every VM's start and
//! stop here, most of it not the transaction but `nft`'s start and exit (closing its netlink
//! socket waits for the replaced ruleset's RCU grace period: nf_tables flushes its destroy
//! work on a socket's release); the same transaction through a kept context takes well under
//! a millisecond. Where the library cannot be loaded, banger runs `nft` as before.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFn = unsafe extern "C" fn(*mut c_void);
type CtxFlag = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxText = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The entry points used, as nftables 1.0's `nftables/libnftables.h` declares them.
struct Lib {
    ctx_new: CtxNew,
    ctx_free: CtxFn,
    buffer_output: CtxFlag,
    buffer_error: CtxFlag,
    output_buffer: CtxText,
    error_buffer: CtxText,
    run_cmd_from_buffer: RunCmd,
}

fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(|| match Lib::load() {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::info!("{e}: running the nft program instead");
            None
        }
    })
    .as_ref()
}

impl Lib {
    fn load() -> Result<Lib, String> {
        // SAFETY: the name is NUL-terminated; the handle is never closed (the library stays
        // loaded for the life of the process).
        let h = unsafe {
            libc::dlopen(
                c"libnftables.so.1".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_LOCAL,
            )
        };
        if h.is_null() {
            return Err("cannot load libnftables.so.1".into());
        }
        let sym = |name: &CStr| -> Result<*mut c_void, String> {
            // SAFETY: `h` is a live handle; `name` is NUL-terminated.
            let p = unsafe { libc::dlsym(h, name.as_ptr()) };
            if p.is_null() {
                Err(format!("libnftables has no {}", name.to_string_lossy()))
            } else {
                Ok(p)
            }
        };
        // SAFETY: each symbol is looked up by its C name and given the type its header
        // declares.
        unsafe {
            use std::mem::transmute;
            Ok(Lib {
                ctx_new: transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
                ctx_free: transmute::<*mut c_void, CtxFn>(sym(c"nft_ctx_free")?),
                buffer_output: transmute::<*mut c_void, CtxFlag>(sym(c"nft_ctx_buffer_output")?),
                buffer_error: transmute::<*mut c_void, CtxFlag>(sym(c"nft_ctx_buffer_error")?),
                output_buffer: transmute::<*mut c_void, CtxText>(sym(
                    c"nft_ctx_get_output_buffer",
                )?),
                error_buffer: transmute::<*mut c_void, CtxText>(sym(c"nft_ctx_get_error_buffer")?),
                run_cmd_from_buffer: transmute::<*mut c_void, RunCmd>(sym(
                    c"nft_run_cmd_from_buffer",
                )?),
            })
        }
    }
}

/// One nftables context: its netlink socket, in the network namespace of the thread that
/// made it, and its cache of the ruleset. Used by one thread at a time.
pub struct Nft {
    lib: &'static Lib,
    ctx: *mut c_void,
}

// SAFETY: a context is not shared; whoever holds the `Nft` alone calls into it.
unsafe impl Send for Nft {}

impl Nft {
    /// A context in the calling thread's network namespace; `None` without the library.
    pub fn new() -> Option<Nft> {
        let lib = lib()?;
        // SAFETY: NFT_CTX_DEFAULT (0) is a valid flag set; the result is checked.
        let ctx = unsafe { (lib.ctx_new)(0) };
        if ctx.is_null() {
            tracing::warn!("nft_ctx_new failed: running the nft program instead");
            return None;
        }
        // SAFETY: `ctx` is live. Both streams buffered: nothing reaches the daemon's own
        // stdout or stderr.
        unsafe {
            (lib.buffer_output)(ctx);
            (lib.buffer_error)(ctx);
        }
        Some(Nft { lib, ctx })
    }

    /// Runs `script` (what `nft -f -` would read) as one transaction; on failure, nft's
    /// own message. Returns what it printed (for `list` commands).
    pub fn run(&mut self, script: &str) -> Result<String, String> {
        let text = CString::new(script).map_err(|_| "the nft script has a NUL byte")?;
        // SAFETY: `ctx` is live and used by this thread alone; `text` is NUL-terminated.
        let rc = unsafe { (self.lib.run_cmd_from_buffer)(self.ctx, text.as_ptr()) };
        // Reading a buffer rewinds it: each run's text is its own.
        let output = self.take(self.lib.output_buffer);
        let error = self.take(self.lib.error_buffer);
        if rc == 0 {
            Ok(output)
        } else if error.trim().is_empty() {
            Err(format!("nft returned {rc}"))
        } else {
            Err(error.trim().to_owned())
        }
    }

    fn take(&self, get: CtxText) -> String {
        // SAFETY: `ctx` is live; the buffer is NUL-terminated and valid until the next call
        // into the context, and copied before it.
        let p = unsafe { get(self.ctx) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: non-null, NUL-terminated, see above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from nft_ctx_new and is freed once.
        unsafe { (self.lib.ctx_free)(self.ctx) }
    }
}

/// Runs `script` through the daemon's kept context (made on first use, on a thread of the
/// daemon's own network namespace; a context whose run failed is replaced, in case its
/// socket is what failed). `None` when the library is not there.
pub fn run(script: &str) -> Option<Result<(), String>> {
    static KEPT: Mutex<Option<Nft>> = Mutex::new(None);
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.is_none() {
        // Its socket stays in the namespace it is made in: only the daemon's own will do.
        let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if ns("/proc/thread-self/ns/net").ok()? != ns("/proc/self/ns/net").ok()? {
            return None;
        }
        *kept = Some(Nft::new()?);
    }
    let r = kept.as_mut().expect("made above").run(script).map(drop);
    if r.is_err() {
        *kept = None;
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// In a network namespace of the test's own: a ruleset replaced whole twice through one
    /// context (what the kept context does on every VM), read back; a bad script's error is
    /// nft's, and the context still serves.
    #[test]
    fn one_context_replaces_a_ruleset_and_reports_nfts_errors() {
        if !is_root() && std::env::var_os("BANGER_REQUIRE_INTEGRATION").is_none() {
            eprintln!("skipped: needs root (a network namespace)");
            return;
        }
        assert!(
            lib().is_some(),
            "libnftables.so.1 (apt-get install nftables)"
        );
        std::thread::spawn(|| {
            // SAFETY: unshare of the network namespace changes this thread's alone.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let mut nft = Nft::new().unwrap();
            let ruleset = |addr: &str| {
                format!(
                    "table inet t\ndelete table inet t\ntable inet t {{\n chain c {{\n  \
                     type filter hook forward priority 0; policy drop;\n  \
                     iifname \"bgr0\" ip saddr != {addr} drop\n }}\n}}\n"
                )
            };
            for addr in ["10.1.0.2", "10.1.0.3"] {
                nft.run(&ruleset(addr)).unwrap();
                let listed = nft.run("list table inet t").unwrap();
                assert!(
                    listed.contains(&format!("ip saddr != {addr} drop")),
                    "{listed}"
                );
            }
            let e = nft.run("table inet t { chain c { bogus; } }").unwrap_err();
            assert!(e.contains("syntax error"), "{e}");
            assert!(nft.run("list table inet t").unwrap().contains("10.1.0.3"));
            assert!(nft.run("a\0b").unwrap_err().contains("NUL"));
        })
        .join()
        .unwrap();
    }
}
