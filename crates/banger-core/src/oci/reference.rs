//! Image references: parsing (docker.io/library defaults) and the default image name.

use oci_client::Reference;

use crate::{Error, Result};

/// Parses a reference, refusing anything malformed with a message that shows the form.
pub fn parse(s: &str) -> Result<Reference> {
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(malformed(s, "it is empty, too long or contains spaces"));
    }
    let r = s
        .parse::<Reference>()
        .map_err(|e| malformed(s, &e.to_string()))?;
    // The distribution spec allows only lower-case repositories; registries reject others
    // with an obscure error, so say it here.
    let repo_ok = r
        .repository()
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
    if !repo_ok {
        return Err(malformed(
            s,
            "the repository must be lower-case letters, digits and . _ - /",
        ));
    }
    Ok(r)
}

fn malformed(s: &str, why: &str) -> Error {
    super::OciError::Reference {
        reference: s.to_owned(),
        why: why.to_owned(),
    }
    .into()
}

/// The name an image pulled from `r` gets by default: the repository's last segment and the
/// tag (`docker.io/library/debian:bookworm` → `debian-bookworm`), or the digest's first 12 hex
/// digits, cleaned to the name rules.
pub fn default_name(r: &Reference) -> String {
    let last = r.repository().rsplit('/').next().unwrap_or("image");
    let suffix = match (r.tag(), r.digest()) {
        (Some(t), _) => t.to_owned(),
        (None, Some(d)) => d.split(':').nth(1).unwrap_or(d).chars().take(12).collect(),
        (None, None) => "latest".to_owned(),
    };
    let raw = format!("{last}-{suffix}");
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_start_matches(['.', '-']).to_owned();
    name.truncate(64);
    if name.is_empty() {
        name = "image".into();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_refs() {
        let n = |s: &str| default_name(&parse(s).unwrap());
        assert_eq!(n("docker.io/library/debian:bookworm"), "debian-bookworm");
        assert_eq!(n("debian:bookworm"), "debian-bookworm");
        assert_eq!(n("busybox"), "busybox-latest");
        assert_eq!(n("127.0.0.1:5000/test/tiny:v1"), "tiny-v1");
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(n(&format!("127.0.0.1:5000/tiny@{d}")), "tiny-0123456789ab");
    }

    #[test]
    fn malformed_refs_are_refused() {
        for bad in ["", "UPPER/case", "a b", "debian:", "::", "x@sha256:zz"] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("Malformed image reference"),
                "{bad}: {e}"
            );
        }
    }
}
