//! `banger vm cp SRC NAME:DST` and `banger vm cp NAME:SRC DST`: files and trees in and out of
//! a running VM through its agent, as `machinectl copy-to`/`copy-from` do. The host side is
//! read and written here, with the caller's own rights; the daemon only hands out the stream.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context};

use crate::agent::files::{self, FrameReader, FrameWriter};
use crate::agent::{frame, Request};

/// One side of a copy: a path on the host, or `VM:PATH` in a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// A host path.
    Host(String),
    /// A VM and a path in it.
    Guest(String, String),
}

/// Parses `VM:PATH` (a VM name has no `/`; write `./a:b` for a host path with a colon).
pub fn side(s: &str) -> Side {
    match s.split_once(':') {
        Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => Side::Guest(
            vm.to_owned(),
            if path.is_empty() {
                "/root".into()
            } else {
                path.to_owned()
            },
        ),
        _ => Side::Host(s.to_owned()),
    }
}

/// A copy's work on a stream to the agent, run on a blocking thread.
pub type CopyJob = Box<dyn FnOnce(std::os::unix::net::UnixStream) -> anyhow::Result<()> + Send>;

/// The VM a copy between `src` and `dst` reaches, and the copy to run on its agent's stream.
pub fn plan(src: &str, dst: &str) -> anyhow::Result<(String, CopyJob)> {
    Ok(match (side(src), side(dst)) {
        (Side::Host(h), Side::Guest(vm, g)) => {
            (vm, Box::new(move |s| copy_to(s, Path::new(&h), &g)))
        }
        (Side::Guest(vm, g), Side::Host(h)) => {
            (vm, Box::new(move |s| copy_from(s, &g, Path::new(&h))))
        }
        _ => bail!(
            "One side must be VM:PATH and the other a host path (write ./a:b for a host path \
             with a colon)"
        ),
    })
}

/// Counts what passes, on a progress line when stderr is a terminal.
struct Counted<T> {
    inner: T,
    bar: Option<indicatif::ProgressBar>,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            if let Ok(s) = indicatif::ProgressStyle::with_template(
                "{spinner} {bytes} copied ({binary_bytes_per_sec})",
            ) {
                b.set_style(s);
            }
            b
        });
        Counted { inner, bar }
    }
    fn add(&self, n: usize) {
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
    }
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.add(n);
        Ok(n)
    }
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.add(n);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The agent's reply line, read byte by byte so no frame after it is consumed.
fn reply(s: &mut impl Read) -> anyhow::Result<crate::agent::Reply> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).context("The guest agent hung up")?;
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 * 1024 {
            bail!("The guest agent's reply is too long");
        }
    }
    let r: crate::agent::Reply =
        serde_json::from_slice(&line).context("The guest agent answered something unexpected")?;
    if !r.ok {
        bail!("{}", r.error);
    }
    Ok(r)
}

fn send(s: &mut impl Write, req: &Request) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(())
}

/// Copies host `src` to `dst` in the guest behind the agent stream `s`.
pub fn copy_to(mut s: std::os::unix::net::UnixStream, src: &Path, dst: &str) -> anyhow::Result<()> {
    let meta =
        std::fs::symlink_metadata(src).with_context(|| format!("Cannot read {}", src.display()))?;
    send(
        &mut s,
        &Request::Put {
            path: dst.to_owned(),
            name: files::base_name(src),
            dir: meta.is_dir(),
        },
    )?;
    reply(&mut s)?;
    {
        let mut out = FrameWriter::new(s.try_clone()?, frame::STDIN);
        let mut counted = Counted::new(&mut out);
        files::pack(src, &files::base_name(src), &mut counted)
            .with_context(|| format!("Cannot read {}", src.display()))?;
        drop(counted);
        out.frame(frame::STDIN, b"")?;
    }
    let mut back = FrameReader::new(s, frame::STDOUT);
    if back.finish()? != 0 {
        bail!("{}", back.error.trim());
    }
    Ok(())
}

/// Copies `src` in the guest behind the agent stream `s` to host `dst`.
pub fn copy_from(
    mut s: std::os::unix::net::UnixStream,
    src: &str,
    dst: &Path,
) -> anyhow::Result<()> {
    send(
        &mut s,
        &Request::Get {
            path: src.to_owned(),
        },
    )?;
    let r = reply(&mut s)?;
    let target = files::landing(dst, &files::base_name(Path::new(src)));
    let mut input = FrameReader::new(s, frame::STDOUT);
    // What the guest sends is an attacker's: masked modes, no devices, no links followed.
    let unpacked =
        crate::agent::untrusted::unpack(Counted::new(&mut input), &target, r.dir.unwrap_or(false));
    let code = input.finish();
    if !input.error.is_empty() {
        bail!("{}", input.error.trim());
    }
    let skipped = unpacked.with_context(|| format!("Cannot write {}", target.display()))?;
    if code? != 0 {
        bail!("The copy failed in the guest");
    }
    if skipped.modes_masked > 0 {
        eprintln!(
            "banger: {} file(s) lost setuid, setgid or sticky bits, as cp without -p does",
            skipped.modes_masked
        );
    }
    if !skipped.entries.is_empty() {
        eprintln!(
            "banger: skipped {} entr(ies) that are not files, directories or links inside the \
             copy:",
            skipped.entries.len()
        );
        for e in skipped.entries.iter().take(20) {
            eprintln!("  {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse_as_machinectl_users_expect() {
        assert_eq!(
            side("dev:/etc/hosts"),
            Side::Guest("dev".into(), "/etc/hosts".into())
        );
        assert_eq!(side("dev:"), Side::Guest("dev".into(), "/root".into()));
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/tmp/x"), Side::Host("/tmp/x".into()));
    }
}
