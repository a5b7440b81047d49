//! Test-only fault points (debug builds only; a release build compiles them to nothing).
//!
//! The fault-injection suite kills the daemon at chosen moments: it writes a point's name into
//! `<runtime dir>/fault-at`, and the first time the daemon reaches that point it removes the
//! file (so the next daemon does not die there too) and kills itself with SIGKILL, exactly as
//! an outside kill would. Points are the stage boundaries of every job (`stage:<name>`) and
//! the steps between a publish's or delete's file and row changes (`<what>:<step>`).

#[cfg(debug_assertions)]
static ARMED: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Where this daemon looks for a fault point (`<runtime dir>/fault-at`).
pub fn arm(runtime_dir: &std::path::Path) {
    #[cfg(debug_assertions)]
    let _ = ARMED.set(runtime_dir.join("fault-at"));
    #[cfg(not(debug_assertions))]
    let _ = runtime_dir;
}

/// Dies here if the suite asked for this point.
#[inline]
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    if let Some(file) = ARMED.get() {
        if std::fs::read_to_string(file).is_ok_and(|w| w.trim() == name) {
            let _ = std::fs::remove_file(file);
            tracing::warn!("Fault point {name}: killing the daemon (test-only)");
            // SAFETY: kill(2) on this process with a constant signal; no memory involved.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
