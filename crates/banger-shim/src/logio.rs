//! Where a task's output goes, as containerd names it in `CreateTask`'s `stdout`/`stderr`
//! (the runc shim's rules, `pkg/process/io.go`): a path with no scheme (or `fifo://`) is a
//! FIFO of containerd's clients; `file:///PATH` appends both streams to one file, its
//! directory made; `binary:///PATH?K=V` starts a logging program with the task's stdout on fd
//! 3, its stderr on fd 4 and fd 5 to close once it is ready (`CONTAINER_ID` and
//! `CONTAINER_NAMESPACE` in its environment, each query pair two arguments) — nerdctl's
//! logging drivers are such programs. Only a task's first process may have a log URI; execs
//! always have FIFOs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::fs::File;

/// How long a logging program has to take what it was given once the process ended, before
/// it is killed (as the runc shim does).
const LOGGER_GRACE: Duration = Duration::from_secs(10);

/// A process's two output streams, and the logging program behind them if any.
pub struct Output {
    pub out: Option<File>,
    pub err: Option<File>,
    logger: Option<tokio::process::Child>,
}

impl Output {
    /// Opens what `stdout` and `stderr` name for task `id` of `namespace`.
    pub async fn open(
        stdout: &str,
        stderr: &str,
        id: &str,
        namespace: &str,
    ) -> Result<Output, String> {
        let (scheme, rest) = match stdout.split_once("://") {
            Some((s, rest)) if !s.contains('/') => (s, rest),
            _ => ("fifo", stdout),
        };
        match scheme {
            "fifo" => Ok(Output {
                out: fifo(rest).await?,
                err: fifo(stderr.strip_prefix("fifo://").unwrap_or(stderr)).await?,
                logger: None,
            }),
            "file" => {
                let u = url::Url::parse(stdout).map_err(|e| format!("stdout {stdout:?}: {e}"))?;
                let path = u
                    .to_file_path()
                    .map_err(|()| format!("stdout {stdout:?}: not a local absolute path"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("log directory {}: {e}", dir.display()))?;
                }
                let open = || {
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(&path)
                        .map(File::from_std)
                        .map_err(|e| format!("log file {}: {e}", path.display()))
                };
                Ok(Output {
                    out: Some(open()?),
                    err: Some(open()?),
                    logger: None,
                })
            }
            "binary" => binary(stdout, id, namespace).await,
            other => Err(format!(
                "stdout {stdout:?}: unknown scheme {other:?} (fifo, file or binary)"
            )),
        }
    }

    /// Once the process's output was all written: the streams end, and a logging program
    /// gets [`LOGGER_GRACE`] to finish with them.
    pub async fn finish(mut self) {
        drop(self.out.take());
        drop(self.err.take());
        if let Some(mut child) = self.logger.take() {
            if tokio::time::timeout(LOGGER_GRACE, child.wait())
                .await
                .is_err()
            {
                log::warn!("the logging program did not end within {LOGGER_GRACE:?}: killed");
                let _ = child.kill().await;
            }
        }
    }
}

async fn fifo(path: &str) -> Result<Option<File>, String> {
    if path.is_empty() {
        return Ok(None);
    }
    tokio::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .await
        .map(Some)
        .map_err(|e| format!("{path}: {e}"))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The command a `binary://` URI names (containerd's `NewBinaryCmd`): the path, and each
/// query pair as two arguments.
fn command(uri: &str) -> Result<(std::path::PathBuf, Vec<String>), String> {
    let u = url::Url::parse(uri).map_err(|e| format!("stdout {uri:?}: {e}"))?;
    if u.host_str().is_some_and(|h| !h.is_empty()) || !u.path().starts_with('/') {
        return Err(format!(
            "stdout {uri:?}: a logging program is named by its absolute path (binary:///PATH)"
        ));
    }
    let path = url::Url::parse(&format!("file://{}", u.path()))
        .ok()
        .and_then(|f| f.to_file_path().ok())
        .ok_or_else(|| format!("stdout {uri:?}: not a path"))?;
    let args = u
        .query_pairs()
        .flat_map(|(k, v)| {
            let mut a = vec![k.into_owned()];
            if !v.is_empty() {
                a.push(v.into_owned());
            }
            a
        })
        .collect();
    Ok((path, args))
}

async fn binary(uri: &str, id: &str, namespace: &str) -> Result<Output, String> {
    let (path, args) = command(uri)?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let given = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(&args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way of 3..=5, then into place (dup2 clears close-on-exec).
            let mut moved = [0; 3];
            for (m, fd) in moved.iter_mut().zip(given) {
                *m = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *m < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(moved) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("logging program {}: {e}", path.display()))?;
    drop((out_r, err_r, ready_w));
    // Ready once it closed (or wrote to) fd 5: it holds what it needs of the streams.
    let ready = File::from_std(std::fs::File::from(ready_r));
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncReadExt;
        let mut ready = ready;
        ready.read(&mut byte).await
    })
    .await;
    let mut output = Output {
        out: Some(File::from_std(std::fs::File::from(out_w))),
        err: Some(File::from_std(std::fs::File::from(err_w))),
        logger: Some(child),
    };
    match waited {
        Ok(Ok(_)) => Ok(output),
        Ok(Err(e)) => {
            let _ = output.logger.as_mut().map(|c| c.start_kill());
            Err(format!("logging program {}: {e}", path.display()))
        }
        Err(_) => {
            let _ = output.logger.as_mut().map(|c| c.start_kill());
            Err(format!(
                "logging program {} was not ready (fd 5 closed) within 30 s",
                path.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_uri_is_a_path_and_pairs_of_arguments() {
        let (path, args) = command("binary:///usr/bin/log%20ger?-f=x&verbose=").unwrap();
        assert_eq!(path, std::path::Path::new("/usr/bin/log ger"));
        assert_eq!(args, ["-f", "x", "verbose"]);
        for bad in ["binary://host/usr/bin/x", "binary:relative"] {
            assert!(command(bad).is_err(), "{bad}");
        }
    }
}
