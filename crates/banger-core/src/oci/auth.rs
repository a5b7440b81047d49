//! Registry credentials: `user:password` pairs, found in the containers-auth.json format that
//! podman, skopeo and Docker write (`{"auths": {"REGISTRY": {"auth": base64("user:password")}}}`).
//! A credential never appears in a log line, a job, a property or an error: its `Debug` is
//! redacted and no message quotes it.

use std::path::Path;

use super::error::invalid;
use crate::Result;

/// A user and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// Parses `user:password` (PullImage's `auth` option).
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() && !s.contains(['\n', '\0']) => {
                Ok(Credentials {
                    user: u.to_owned(),
                    password: p.to_owned(),
                })
            }
            _ => Err(invalid("auth must be user:password (neither part empty)")),
        }
    }

    /// As PullImage's `auth` option.
    pub fn to_option(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }
}

/// The names a registry may be filed under in an auth file: its host (with port), and for
/// Docker Hub the names Docker itself uses.
fn keys_for(registry: &str) -> Vec<String> {
    let mut keys = vec![registry.to_owned()];
    if matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        keys.extend(
            [
                "docker.io",
                "index.docker.io",
                "registry-1.docker.io",
                "https://index.docker.io/v1/",
            ]
            .map(String::from),
        );
    }
    keys
}

/// The credentials for `registry` in an auth file's text (`auths` → `auth`, or `username`
/// and `password`); keys may be written as URLs (`https://host/…`).
pub fn lookup(text: &str, registry: &str) -> Option<Credentials> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let wanted = keys_for(registry);
    for (key, entry) in auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        if !wanted.iter().any(|w| w == key || w == host) {
            continue;
        }
        if let Some(b64) = entry.get("auth").and_then(|a| a.as_str()) {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()?;
            return Credentials::parse(&String::from_utf8(raw).ok()?).ok();
        }
        if let (Some(u), Some(p)) = (
            entry.get("username").and_then(|u| u.as_str()),
            entry.get("password").and_then(|p| p.as_str()),
        ) {
            return Credentials::parse(&format!("{u}:{p}")).ok();
        }
    }
    None
}

/// The credentials for `registry` in the auth file at `path`, if it has any.
pub fn from_file(path: &Path, registry: &str) -> Option<Credentials> {
    let text = std::fs::read_to_string(path).ok()?;
    lookup(&text, registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_files_in_the_containers_format_give_their_credentials() {
        let text = r#"{"auths": {
            "127.0.0.1:5000": {"auth": "YWxpY2U6czNjcjN0"},
            "https://index.docker.io/v1/": {"auth": "Ym9iOmh1bnRlcjI="},
            "quay.io": {"username": "carol", "password": "pw"}
        }}"#;
        let c = lookup(text, "127.0.0.1:5000").unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s3cr3t"));
        assert_eq!(lookup(text, "docker.io").unwrap().user, "bob");
        assert_eq!(lookup(text, "quay.io").unwrap().password, "pw");
        assert!(lookup(text, "127.0.0.1:5001").is_none());
        assert!(lookup("not json", "quay.io").is_none());
        // Never printed.
        assert_eq!(format!("{c:?}"), "Credentials(<redacted>)");
        assert!(Credentials::parse("nopassword").is_err());
        assert!(Credentials::parse(":x").is_err());
    }
}
