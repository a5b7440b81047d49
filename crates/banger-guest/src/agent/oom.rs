//! `oom`: the guest kernel's OOM kills as they happen. The kernel sums up each kill in one
//! `oom-kill:` record of its log (`…,task_memcg=/,task=dd,pid=219,uid=0`); the agent reads
//! `/dev/kmsg` from the time of the request and sends each kill as a `STDOUT` frame holding
//! one JSON [`OomKill`], until the client hangs up (polled with the log, so a client that
//! went leaves no thread behind).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::files::FrameWriter;
use super::{frame, OomKill};

/// The kill a `/dev/kmsg` record tells of, if it is an `oom-kill:` summary.
pub fn parse(record: &str) -> Option<OomKill> {
    // `PRIORITY,SEQUENCE,TIME,FLAGS;MESSAGE`, then continuation lines.
    let message = record.split_once(';')?.1.lines().next()?;
    let fields = message.strip_prefix("oom-kill:")?;
    let mut kill = OomKill::default();
    let mut pid = None;
    for f in fields.split(',') {
        match f.split_once('=') {
            Some(("pid", v)) => pid = v.parse().ok(),
            Some(("task", v)) => kill.task = v.to_owned(),
            Some(("task_memcg", v)) => kill.memcg = v.to_owned(),
            Some(("uid", v)) => kill.uid = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    kill.pid = pid?;
    Some(kill)
}

/// Follows the kernel's log for OOM kills, telling `writer` of each, until the client on
/// `conn` hangs up.
pub fn follow(conn: &std::fs::File, writer: &mut std::fs::File) -> std::io::Result<()> {
    let kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")?;
    // From now on: what the log holds already happened before the request.
    // SAFETY: lseek takes no pointers; the descriptor is open.
    unsafe { libc::lseek(kmsg.as_raw_fd(), 0, libc::SEEK_END) };
    super::server::write_line(writer, &super::Reply::ok())?;
    let mut out = FrameWriter::new(writer, frame::STDOUT);
    let mut record = vec![0u8; 8192];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: kmsg.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two pollfd structures, as the count says.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            // The client sends nothing: anything, or its end, means it is done.
            return Ok(());
        }
        // One record per read; EPIPE when older records were overwritten meanwhile (the
        // next read goes on from the oldest left), EAGAIN once all were read.
        loop {
            // SAFETY: a read into `record`, of at most its length.
            let n =
                unsafe { libc::read(kmsg.as_raw_fd(), record.as_mut_ptr().cast(), record.len()) };
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EPIPE) | Some(libc::EINTR) => continue,
                    _ => break,
                }
            }
            if n == 0 {
                break;
            }
            if let Some(kill) = parse(&String::from_utf8_lossy(&record[..n as usize])) {
                let json = serde_json::to_vec(&kill).map_err(std::io::Error::other)?;
                out.write_all(&json)?;
                out.flush()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_kill_record_is_its_pid_task_cgroup_and_uid() {
        let r = "3,812,4109923,-;oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),\
                 cpuset=/,mems_allowed=0,global_oom,task_memcg=/,task=dd,pid=219,uid=0\n";
        assert_eq!(
            parse(r),
            Some(OomKill {
                pid: 219,
                task: "dd".into(),
                memcg: "/".into(),
                uid: 0
            })
        );
        for other in [
            "3,813,4109950,-;Out of memory: Killed process 219 (dd) total-vm:1kB\n",
            "6,1,0,-;oom-kill:task=x\n",
            "no separator",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }
}
