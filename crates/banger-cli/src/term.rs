//! The local terminal for `vm exec -t` and `vm shell`: raw mode while the remote command
//! has it (so Ctrl-C and every other key reach the guest, not this process), and its size,
//! sent again whenever the window changes.

/// Raw mode on standard input until dropped (nothing when it is not a terminal).
pub struct RawMode(Option<libc::termios>);

impl RawMode {
    /// Puts standard input in raw mode when it is a terminal.
    pub fn enter() -> RawMode {
        // SAFETY: a zeroed termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::isatty(0) } != 1 || unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return RawMode(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr take a valid termios.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read at entry.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// The window size (`rows`, `cols`) of the terminal on stdin or stdout; 24×80 otherwise.
pub fn size() -> (u16, u16) {
    for fd in [0, 1] {
        // SAFETY: a zeroed winsize is a valid buffer for TIOCGWINSZ to fill.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return (ws.ws_row, ws.ws_col);
        }
    }
    (24, 80)
}

/// What the command hears of this process: on a terminal, the window's new sizes
/// (SIGWINCH; Ctrl-C travels as a key there); without one, SIGINT, SIGTERM, SIGHUP and
/// SIGQUIT, forwarded to the command as ssh forwards them, instead of leaving it running
/// in the guest when this client ends.
pub fn controls(tty: bool) -> tokio::sync::mpsc::UnboundedReceiver<crate::agent::Control> {
    use crate::agent::Control;
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let kinds = if tty {
        vec![SignalKind::window_change()]
    } else {
        [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]
            .map(SignalKind::from_raw)
            .to_vec()
    };
    for kind in kinds {
        let Ok(mut s) = signal(kind) else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                let c = if tty {
                    let (rows, cols) = size();
                    Control::Resize(rows, cols)
                } else {
                    Control::Signal(kind.as_raw_value())
                };
                if tx.send(c).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// The terminal request for the agent: this terminal's size and `TERM`.
pub fn tty() -> crate::agent::Tty {
    let (rows, cols) = size();
    crate::agent::Tty {
        rows,
        cols,
        term: std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty() && t.len() < 64)
            .unwrap_or_else(|| crate::agent::Tty::default().term),
    }
}
