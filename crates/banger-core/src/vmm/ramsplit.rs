//! A QEMU migration stream split in two: the pages of the guest's memory (RAM block `mem`) as a
//! plain file, at their offsets, and everything else (device state, the firmware's and ACPI
//! tables' small blocks) as a stream QEMU loads into a VM whose `mem` already holds those
//! pages. A snapshot keeps both; a restore maps the file copy-on-write instead of reading every
//! page through the stream, so VMs restored from one snapshot share what none of them wrote.
//!
//! Only the part of the format that carries RAM is parsed (QEMU's `savevm.c` and `ram.c`,
//! format version 3): the header, the configuration section, the `ram` handler's sections and
//! their page records. The first device section ends the parsing: the rest is copied as it is.
//! QEMU 10's switchover notice (a command without data) passes through. Anything else
//! (compressed or XBZRLE pages, postcopy commands, another iterative handler, a configuration
//! with subsections) is refused with what it was, never guessed at.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

/// The guest page size of the streams this reads (x86).
const PAGE: u64 = 4096;

const MAGIC: &[u8; 4] = b"QEVM";
const VERSION: u32 = 3;

// Section types (`savevm.c`).
const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const FOOTER: u8 = 0x7e;

/// The one command a saved state may carry: QEMU 10 tells the destination that the source
/// stopped (`MIG_CMD_SWITCHOVER_START`, no data) before the last of RAM.
const CMD_SWITCHOVER_START: u16 = 11;

// Page record flags (`ram.c`), in the low bits of each record's offset.
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const KNOWN_FLAGS: u64 = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE;

/// What a split found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// The size of the RAM block (and so of the file).
    pub ram_bytes: u64,
    /// Pages written into the file (not zero).
    pub pages: u64,
    /// Bytes of the rest.
    pub rest_bytes: u64,
}

fn bad(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("QEMU's migration stream: {}", what.into()),
    )
}

/// Reads the stream from `input`; the pages of RAM block `block` go into `ram` (made the
/// block's size; pages of zeros stay holes), the rest to `rest`.
pub fn split(
    input: impl Read,
    block: &str,
    ram: &std::fs::File,
    rest: impl Write,
) -> std::io::Result<Split> {
    let mut s = Splitter {
        r: std::io::BufReader::with_capacity(1 << 20, input),
        w: Counting { inner: rest, n: 0 },
        block: block.to_owned(),
        ram,
        written: std::collections::HashSet::new(),
        out: Split::default(),
        ram_section: None,
        last_block: String::new(),
    };
    s.run()?;
    s.w.inner.flush()?;
    s.out.rest_bytes = s.w.n;
    Ok(s.out)
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct Splitter<'a, R, W> {
    r: std::io::BufReader<R>,
    w: Counting<W>,
    block: String,
    ram: &'a std::fs::File,
    /// Pages of the block written into the file (a page sent again as zeros is zeroed).
    written: std::collections::HashSet<u64>,
    out: Split,
    /// The `ram` handler's section id, once its START section came.
    ram_section: Option<u32>,
    /// The block the last page record named (records may say "the same block").
    last_block: String,
}

impl<R: Read, W: Write> Splitter<'_, R, W> {
    fn bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0; n];
        self.r
            .read_exact(&mut v)
            .map_err(|e| bad(format!("it ends early ({e})")))?;
        Ok(v)
    }
    fn u8(&mut self) -> std::io::Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        let b = self.bytes(8)?;
        Ok(u64::from_be_bytes(b.try_into().unwrap_or_default()))
    }
    /// A string with a one-byte length.
    fn name(&mut self) -> std::io::Result<String> {
        let n = self.u8()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b).map_err(|_| bad("a block name that is not UTF-8"))
    }
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.w.write_all(b)
    }
    fn put_name(&mut self, s: &str) -> std::io::Result<()> {
        self.put(&[s.len() as u8])?;
        self.put(s.as_bytes())
    }

    fn run(&mut self) -> std::io::Result<()> {
        let magic = self.bytes(4)?;
        if magic != MAGIC {
            return Err(bad("no QEVM header"));
        }
        let version = self.u32()?;
        if version != VERSION {
            return Err(bad(format!("format version {version}, not {VERSION}")));
        }
        self.put(MAGIC)?;
        self.put(&VERSION.to_be_bytes())?;
        loop {
            let kind = self.u8()?;
            match kind {
                CONFIGURATION => {
                    let n = self.u32()?;
                    if n > 256 {
                        return Err(bad(format!("a machine name of {n} bytes")));
                    }
                    let name = self.bytes(n as usize)?;
                    self.put(&[CONFIGURATION])?;
                    self.put(&n.to_be_bytes())?;
                    self.put(&name)?;
                }
                SECTION_START => {
                    let id = self.u32()?;
                    let idstr = self.name()?;
                    let (instance, version) = (self.u32()?, self.u32()?);
                    if idstr != "ram" {
                        return Err(bad(format!("an iterative section {idstr:?} besides RAM")));
                    }
                    self.put(&[SECTION_START])?;
                    self.put(&id.to_be_bytes())?;
                    self.put_name(&idstr)?;
                    self.put(&instance.to_be_bytes())?;
                    self.put(&version.to_be_bytes())?;
                    self.ram_section = Some(id);
                    self.ram_setup()?;
                    self.records()?;
                }
                SECTION_PART | SECTION_END => {
                    let id = self.u32()?;
                    if Some(id) != self.ram_section {
                        return Err(bad(format!("section {id} continues, not RAM's")));
                    }
                    self.put(&[kind])?;
                    self.put(&id.to_be_bytes())?;
                    self.records()?;
                }
                COMMAND => {
                    let head = self.bytes(4)?;
                    let cmd = u16::from_be_bytes([head[0], head[1]]);
                    let len = u16::from_be_bytes([head[2], head[3]]);
                    if cmd != CMD_SWITCHOVER_START || len != 0 {
                        return Err(bad(format!("a command {cmd} of {len} bytes")));
                    }
                    self.put(&[COMMAND])?;
                    self.put(&head)?;
                }
                FOOTER => {
                    let id = self.u32()?;
                    self.put(&[FOOTER])?;
                    self.put(&id.to_be_bytes())?;
                }
                SECTION_FULL | SECTION_EOF => {
                    if self.out.ram_bytes == 0 {
                        return Err(bad(format!(
                            "no RAM block {:?} before the devices",
                            self.block
                        )));
                    }
                    // Devices and the end: no page records follow; the rest as it is.
                    self.put(&[kind])?;
                    std::io::copy(&mut self.r, &mut self.w)?;
                    return Ok(());
                }
                other => return Err(bad(format!("a section of type {other:#x}"))),
            }
        }
    }

    /// The RAM section's setup: the total size and each block's name and size.
    fn ram_setup(&mut self) -> std::io::Result<()> {
        let head = self.u64()?;
        if head & FLAG_MEM_SIZE == 0 {
            return Err(bad("a RAM section without its blocks"));
        }
        let total = head & !(PAGE - 1);
        self.put(&head.to_be_bytes())?;
        let mut seen = 0u64;
        while seen < total {
            let name = self.name()?;
            let len = self.u64()?;
            self.put_name(&name)?;
            self.put(&len.to_be_bytes())?;
            if name == self.block {
                self.out.ram_bytes = len;
                self.ram.set_len(len)?;
            }
            seen += len;
        }
        if seen != total {
            return Err(bad("RAM blocks that do not add up to their total"));
        }
        Ok(())
    }

    /// Page records up to the end of a section's data.
    fn records(&mut self) -> std::io::Result<()> {
        loop {
            let head = self.u64()?;
            let (offset, flags) = (head & !(PAGE - 1), head & (PAGE - 1));
            if flags & !KNOWN_FLAGS != 0 {
                return Err(bad(format!("a page record with flags {flags:#x}")));
            }
            if flags & FLAG_EOS != 0 {
                self.put(&head.to_be_bytes())?;
                return Ok(());
            }
            if flags & (FLAG_ZERO | FLAG_PAGE) == 0 {
                return Err(bad(format!("a record with flags {flags:#x}")));
            }
            if flags & FLAG_CONTINUE == 0 {
                self.last_block = self.name()?;
            } else if self.last_block.is_empty() {
                return Err(bad("a page of no block"));
            }
            let data = if flags & FLAG_PAGE != 0 {
                self.bytes(PAGE as usize)?
            } else {
                vec![self.u8()?]
            };
            if self.last_block == self.block {
                self.keep(offset, &data)?;
            } else {
                // Always with its block's name: the records before it may be gone.
                let block = self.last_block.clone();
                self.put(&(offset | (flags & !FLAG_CONTINUE)).to_be_bytes())?;
                self.put_name(&block)?;
                self.put(&data)?;
            }
        }
    }

    /// A page of the guest's memory, into the file.
    fn keep(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset + PAGE > self.out.ram_bytes {
            return Err(bad(format!("a page at {offset:#x}, past the RAM block")));
        }
        let filled;
        let page = if data.len() == 1 {
            // A page of one repeated byte; zeros are a hole unless the page was written.
            if data[0] == 0 && !self.written.contains(&offset) {
                return Ok(());
            }
            filled = vec![data[0]; PAGE as usize];
            &filled
        } else {
            data
        };
        self.ram.write_all_at(page, offset)?;
        if self.written.insert(offset) {
            self.out.pages += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU 7.2 writes one: two blocks (`mem` and a table), pages of both, a zero
    /// page, a page sent twice, a device section.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(b"QEVM");
        s.extend(3u32.to_be_bytes());
        s.push(CONFIGURATION);
        s.extend(7u32.to_be_bytes());
        s.extend(b"microvm");
        s.push(SECTION_START);
        s.extend(2u32.to_be_bytes());
        s.push(3);
        s.extend(b"ram");
        s.extend(0u32.to_be_bytes());
        s.extend(4u32.to_be_bytes());
        let (mem, table) = (16 * PAGE, PAGE);
        s.extend(((mem + table) | FLAG_MEM_SIZE).to_be_bytes());
        for (name, len) in [("mem", mem), ("/rom@etc/acpi/tables", table)] {
            s.push(name.len() as u8);
            s.extend(name.as_bytes());
            s.extend(len.to_be_bytes());
        }
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend(2u32.to_be_bytes());
        s.push(SECTION_PART);
        s.extend(2u32.to_be_bytes());
        let page = |s: &mut Vec<u8>, off: u64, cont: bool, name: &str, byte: u8| {
            s.extend((off | FLAG_PAGE | if cont { FLAG_CONTINUE } else { 0 }).to_be_bytes());
            if !cont {
                s.push(name.len() as u8);
                s.extend(name.as_bytes());
            }
            s.extend(vec![byte; PAGE as usize]);
        };
        page(&mut s, 0, false, "mem", 0xaa);
        s.extend((PAGE | FLAG_ZERO | FLAG_CONTINUE).to_be_bytes());
        s.push(0);
        page(&mut s, 2 * PAGE, true, "mem", 0xbb);
        page(&mut s, 0, false, "/rom@etc/acpi/tables", 0xcc);
        // The same block again "by continuation", then mem's page 2 again, now zero.
        page(&mut s, 0, true, "", 0xcd);
        s.extend(((2 * PAGE) | FLAG_ZERO).to_be_bytes());
        s.push(3);
        s.extend(b"mem");
        s.push(0);
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend(2u32.to_be_bytes());
        s.push(SECTION_END);
        s.extend(2u32.to_be_bytes());
        page(&mut s, 15 * PAGE, false, "mem", 0x11);
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend(2u32.to_be_bytes());
        s.push(SECTION_FULL);
        s.extend(b"device state, copied as it is");
        s.push(SECTION_EOF);
        s
    }

    #[test]
    fn pages_of_mem_go_to_the_file_and_the_rest_keeps_every_other_record() {
        let d = tempfile::tempdir().unwrap();
        let ram = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("ram"))
            .unwrap();
        let mut rest = Vec::new();
        let got = split(&stream()[..], "mem", &ram, &mut rest).unwrap();
        assert_eq!((got.ram_bytes, got.pages), (16 * PAGE, 3));
        let file = std::fs::read(d.path().join("ram")).unwrap();
        assert_eq!(file.len() as u64, 16 * PAGE);
        let at = |p: u64| file[(p * PAGE) as usize];
        assert_eq!((at(0), at(1), at(2), at(15)), (0xaa, 0, 0, 0x11));
        // The page sent later as zeros is zeros in the file.
        assert!(file[(2 * PAGE) as usize..(3 * PAGE) as usize]
            .iter()
            .all(|b| *b == 0));

        // The rest: no page of mem, both of the table's, each with its block's name.
        assert_eq!(got.rest_bytes, rest.len() as u64);
        let count = |needle: &[u8]| rest.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(
            count(&[0xaa; 4096]) + count(&[0xbb; 4096]) + count(&[0x11; 4096]),
            0
        );
        assert_eq!(count(&[0xcc; 4096]), 1);
        assert_eq!(count(&[0xcd; 4096]), 1);
        assert_eq!(
            count(b"\x14/rom@etc/acpi/tables"),
            3,
            "the setup and both pages name it"
        );
        assert!(rest.ends_with(b"device state, copied as it is\x00"));
        assert!(rest.starts_with(b"QEVM\x00\x00\x00\x03\x07"));

        // Split again, the rest holds no page of mem and the file stays empty: what a
        // restore loads into a VM whose memory already holds them.
        let ram2 = tempfile::tempfile().unwrap();
        let again = split(&rest[..], "mem", &ram2, Vec::new()).unwrap();
        assert_eq!((again.ram_bytes, again.pages), (16 * PAGE, 0));
    }

    #[test]
    fn what_it_does_not_know_is_refused_by_name() {
        let ram = tempfile::tempfile().unwrap();
        let mut s = stream();
        s[0] = b'X';
        let e = split(&s[..], "mem", &ram, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("no QEVM header"), "{e}");

        // An XBZRLE page (flag 0x40) in the first PART section.
        let s = stream();
        let at = s
            .windows(5)
            .position(|w| w == [SECTION_PART, 0, 0, 0, 2])
            .unwrap()
            + 5;
        let mut x = s.clone();
        x[at + 7] |= 0x40;
        let e = split(&x[..], "mem", &ram, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("flags 0x48"), "{e}");

        // No block of that name.
        let e = split(&s[..], "pc.ram", &ram, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("no RAM block \"pc.ram\""), "{e}");

        // Cut short.
        let e = split(&s[..s.len() / 2], "mem", &ram, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("ends early"), "{e}");

        // A command other than QEMU 10's switchover notice (a PING, with its 4 bytes).
        let mut p = with_command(CMD_SWITCHOVER_START);
        let at = p.windows(3).position(|w| w == [COMMAND, 0, 11]).unwrap();
        p.splice(at + 1..at + 5, [0, 2, 0, 4, 0, 0, 0, 1]);
        let e = split(&p[..], "mem", &ram, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("a command 2 of 4 bytes"), "{e}");
    }

    /// [`stream`] with a command (no data) before its last RAM section, where QEMU 10 puts
    /// its switchover notice.
    fn with_command(cmd: u16) -> Vec<u8> {
        let mut s = stream();
        let at = s
            .windows(5)
            .position(|w| w == [SECTION_END, 0, 0, 0, 2])
            .unwrap();
        let mut c = vec![COMMAND];
        c.extend(cmd.to_be_bytes());
        c.extend(0u16.to_be_bytes());
        s.splice(at..at, c);
        s
    }

    #[test]
    fn qemu_10s_switchover_notice_passes_through() {
        let ram = tempfile::tempfile().unwrap();
        let mut rest = Vec::new();
        let got = split(
            &with_command(CMD_SWITCHOVER_START)[..],
            "mem",
            &ram,
            &mut rest,
        )
        .unwrap();
        assert_eq!((got.ram_bytes, got.pages), (16 * PAGE, 3));
        assert!(
            rest.windows(5).any(|w| w == [COMMAND, 0, 11, 0, 0]),
            "the notice stays in what QEMU loads"
        );
    }
}
