//! The user's API key: made on first use, kept `0600` in the user's configuration directory,
//! and asked of every request (other local users can reach a loopback address too). A
//! sandbox's envd and traffic tokens are derived from it, so they hold across restarts of the
//! facade without being stored.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The key.
#[derive(Clone)]
pub struct Key(String);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: writing into our own buffer's remaining bytes.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), n - got, 0) };
        if r > 0 {
            got += r as usize;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where the key is kept: `$XDG_CONFIG_HOME/banger/e2b-api-key`, else under
/// `~/.config`.
pub fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".config")
        });
    base.join("banger").join("e2b-api-key")
}

impl Key {
    /// The key kept at `path`, made there (0600, its folder 0700) when there is none. A key
    /// file another user owns or others may read is refused.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Key> {
        match std::fs::symlink_metadata(path) {
            Ok(m) => {
                // SAFETY: no arguments.
                let me = unsafe { libc::geteuid() };
                if !m.is_file() || m.uid() != me || m.permissions().mode() & 0o077 != 0 {
                    anyhow::bail!(
                        "{} must be a file of yours that only you may read (chmod 600 it, or \
                         delete it for a new key)",
                        path.display()
                    );
                }
                let k = std::fs::read_to_string(path)?.trim().to_owned();
                if k.len() < 20 {
                    anyhow::bail!("{} holds no key; delete it for a new one", path.display());
                }
                Ok(Key(k))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)?;
                }
                // E2B's own keys' form: e2b_ and 40 hex digits.
                let k = format!("e2b_{}", random_hex(20));
                // Written whole under a name of its own, then linked in: a second process
                // making the key at the same moment finds this one (or links its own first).
                let tmp = path.with_extension(format!("tmp-{}", random_hex(8)));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(format!("{k}\n").as_bytes())?;
                f.sync_all()?;
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Ok(Key(k)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Key::load_or_create(path)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A key given as is (tests).
    pub fn new(k: &str) -> Key {
        Key(k.to_owned())
    }

    /// The key itself.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the key (compared in constant time).
    pub fn matches(&self, given: &str) -> bool {
        same(self.0.as_bytes(), given.as_bytes())
    }

    fn derive(&self, what: &str, sandbox: &str) -> String {
        let mut h = Sha256::new();
        h.update(what.as_bytes());
        h.update([0]);
        h.update(self.0.as_bytes());
        h.update([0]);
        h.update(sandbox.as_bytes());
        h.finalize()
            .iter()
            .take(20)
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    /// The token envd requests to `sandbox` carry (`X-Access-Token`).
    pub fn envd_token(&self, sandbox: &str) -> String {
        self.derive("envd", sandbox)
    }

    /// The token other ports' requests to `sandbox` carry (`e2b-traffic-access-token`).
    pub fn traffic_token(&self, sandbox: &str) -> String {
        self.derive("traffic", sandbox)
    }
}

/// Constant-time equality.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_private_and_refused_when_others_may_read_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cfg/banger/e2b-api-key");
        let k = Key::load_or_create(&p).unwrap();
        assert!(k.secret().starts_with("e2b_") && k.secret().len() == 44);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(p.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert!(Key::load_or_create(&p).unwrap().matches(k.secret()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load_or_create(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn processes_making_the_key_at_once_agree_on_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("banger/e2b-api-key");
        let keys: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Key::load_or_create(&p).unwrap().secret().to_owned()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn tokens_are_the_sandboxs_own() {
        let k = Key::new("e2b_0123456789012345678901234567890123456789");
        assert_ne!(k.envd_token("a"), k.envd_token("b"));
        assert_ne!(k.envd_token("a"), k.traffic_token("a"));
        assert_eq!(k.envd_token("a"), k.envd_token("a"));
        assert!(!k.matches("e2b_0"));
        assert!(k.matches("e2b_0123456789012345678901234567890123456789"));
    }
}
