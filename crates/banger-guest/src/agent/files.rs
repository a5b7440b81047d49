//! Files in and out of a guest through its agent (`banger vm cp`), as tar streams in the
//! agent's frames: `put` unpacks what the client sends (`STDIN` frames, an empty one ends
//! it) at a guest path, `get` packs a guest path (`STDOUT` frames); both end with `EXIT`
//! (0, or 1 after a `STDERR` frame saying why). Modes and mtimes are kept and symbolic links
//! travel as links. Plain blocking I/O: the agent is threads, the CLI copies on a thread.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{frame, header, parse_header};

/// Reads the payload of `STDIN` (or, on the client, `STDOUT`) frames as one stream, until
/// an empty frame or `EXIT`; a `STDERR` frame's text becomes the error.
pub struct FrameReader<R: Read> {
    inner: R,
    kind: u8,
    pending: Vec<u8>,
    at: usize,
    done: bool,
    /// The exit status, once `EXIT` arrived.
    pub exit: Option<i32>,
    /// What a `STDERR` frame said.
    pub error: String,
}

impl<R: Read> FrameReader<R> {
    /// Reads frames of `kind` from `inner`.
    pub fn new(inner: R, kind: u8) -> Self {
        FrameReader {
            inner,
            kind,
            pending: Vec::new(),
            at: 0,
            done: false,
            exit: None,
            error: String::new(),
        }
    }

    /// Reads frames until `EXIT`; its status.
    pub fn finish(&mut self) -> std::io::Result<i32> {
        let mut sink = [0u8; 8192];
        while self.read(&mut sink)? > 0 {}
        while self.exit.is_none() {
            if !self.next_frame()? {
                break;
            }
        }
        self.exit
            .ok_or_else(|| std::io::Error::other("the stream ended before its exit status"))
    }

    /// The next frame into `pending`; false at the end of the connection.
    fn next_frame(&mut self) -> std::io::Result<bool> {
        let mut h = [0u8; 5];
        if let Err(e) = self.inner.read_exact(&mut h) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let (kind, len) =
            parse_header(h).ok_or_else(|| std::io::Error::other("an oversized frame"))?;
        let mut data = vec![0u8; len];
        self.inner.read_exact(&mut data)?;
        match kind {
            frame::EXIT if len == 4 => {
                self.exit = Some(i32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                self.done = true;
            }
            frame::STDERR => self.error.push_str(&String::from_utf8_lossy(&data)),
            k if k == self.kind && len == 0 => self.done = true,
            k if k == self.kind => {
                self.pending = data;
                self.at = 0;
            }
            _ => {}
        }
        Ok(true)
    }
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.pending.len() {
            if self.done || !self.next_frame()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Writes a stream as frames of `kind` (at most [`frame::MAX`] each).
pub struct FrameWriter<W: Write> {
    inner: W,
    kind: u8,
}

impl<W: Write> FrameWriter<W> {
    /// Writes frames of `kind` to `inner`.
    pub fn new(inner: W, kind: u8) -> Self {
        FrameWriter { inner, kind }
    }

    /// Sends a frame of another kind (the end of a stream, an error, the exit status).
    pub fn frame(&mut self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(&header(kind, data.len()))?;
        self.inner.write_all(data)?;
        self.inner.flush()
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(frame::MAX);
        if n == 0 {
            return Ok(0);
        }
        self.inner.write_all(&header(self.kind, n))?;
        self.inner.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Packs `src` (a file, a directory tree, or a link) as a tar stream into `out`: a
/// directory's entries relative to it, a file or link as one entry named `name`. Links are
/// stored as links.
pub fn pack(src: &Path, name: &str, out: impl Write) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let meta = std::fs::symlink_metadata(src)?;
    if meta.is_dir() {
        b.append_dir_all(".", src)?;
    } else {
        b.append_path_with_name(src, name)?;
    }
    b.into_inner()?.flush()
}

/// Unpacks a tar stream from [`pack`] at `target`: a directory's entries into it (made when
/// missing), a single file or link as `target` itself. Nothing lands outside `target`.
pub fn unpack(input: impl Read, target: &Path, dir: bool) -> std::io::Result<()> {
    let mut a = tar::Archive::new(input);
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    if dir {
        std::fs::create_dir_all(target)?;
        return a.unpack(target);
    }
    let mut entries = a.entries()?;
    let mut e = entries
        .next()
        .ok_or_else(|| std::io::Error::other("the copy carried no file"))??;
    // One file or link; a hard link or device from the other side is never made here.
    let kind = e.header().entry_type();
    if !(kind.is_file() || kind.is_symlink()) {
        return Err(std::io::Error::other(format!(
            "expected a file, got a {kind:?} entry"
        )));
    }
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(target)?;
    }
    e.unpack(target)?;
    Ok(())
}

/// Where a copy of something named `name` lands for destination `dest`: inside it when it is
/// a directory (as `cp` does), else `dest` itself.
pub fn landing(dest: &Path, name: &str) -> PathBuf {
    if dest.is_dir() {
        dest.join(name)
    } else {
        dest.to_path_buf()
    }
}

/// The last component of `path`, for naming a copy.
pub fn base_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "copy".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_files_and_links_round_trip_through_frames() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.join("sub/run.sh"),
            std::fs::Permissions::from_mode(0o751),
        )
        .unwrap();
        std::os::unix::fs::symlink("sub/run.sh", src.join("link")).unwrap();
        let mut wire = Vec::new();
        {
            let mut w = FrameWriter::new(&mut wire, frame::STDIN);
            pack(&src, "src", &mut w).unwrap();
            w.frame(frame::STDIN, b"").unwrap();
        }
        let dst = d.path().join("dst");
        unpack(FrameReader::new(&wire[..], frame::STDIN), &dst, true).unwrap();
        let m = std::fs::metadata(dst.join("sub/run.sh")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o751);
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            Path::new("sub/run.sh")
        );

        // One file, named by its destination; an error frame is read as the error.
        let mut wire = Vec::new();
        {
            let mut w = FrameWriter::new(&mut wire, frame::STDOUT);
            pack(&src.join("sub/run.sh"), "run.sh", &mut w).unwrap();
            w.frame(frame::STDOUT, b"").unwrap();
            w.frame(frame::EXIT, &0i32.to_be_bytes()).unwrap();
        }
        let mut r = FrameReader::new(&wire[..], frame::STDOUT);
        unpack(&mut r, &d.path().join("one"), false).unwrap();
        assert_eq!(r.finish().unwrap(), 0);
        assert_eq!(std::fs::read(d.path().join("one")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(landing(d.path(), "x"), d.path().join("x"));
    }
}
