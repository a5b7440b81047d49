//! Catalog bundles: a `.tar.zst` at a URL with a pinned sha256. A kernel bundle holds
//! `vmlinux` (or a bzImage under that name), optional `initrd.img`, optional `modules/` and
//! `manifest.json`; an image bundle holds `rootfs.ext4`, optional `work-seed.ext4` and
//! `manifest.json` (`{"kernel": "…", "ready_ports": […]}`). The download is hashed as it
//! streams and checked before anything is unpacked; unpacking goes through the same hardened
//! flattener as OCI layers (no `..`, no escaping links, a size cap), into a staging directory
//! that is only published after all of it succeeded.

use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::oci::flatten::{Flattener, Limits};
use crate::tree::HostTree;
use crate::{Error, Result};

/// A catalog entry an operator adds in `config.toml` (`[[kernel_catalog]]`,
/// `[[image_catalog]]`): a bundle (`url` + `sha256`) or, for images, an OCI reference (`oci`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// The kernel's or image's name.
    pub name: String,
    /// Where the `.tar.zst` bundle is (http or https).
    #[serde(default)]
    pub url: Option<String>,
    /// The bundle's sha256, hex.
    #[serde(default)]
    pub sha256: Option<String>,
    /// An OCI reference to pull instead (images only).
    #[serde(default)]
    pub oci: Option<String>,
    /// One line for `list --available`.
    #[serde(default)]
    pub description: String,
}

impl CatalogEntry {
    /// Checks the entry: a valid name, and exactly a bundle (url + 64-hex sha256) or an OCI ref.
    pub fn validate(&self, kind: crate::model::NameKind, oci_allowed: bool) -> Result<()> {
        crate::model::validate_name(kind, &self.name)?;
        let bad =
            |why: &str| Error::InvalidArgument(format!("Catalog entry {:?}: {why}", self.name));
        match (&self.url, &self.sha256, &self.oci) {
            (Some(url), Some(sha), None) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad("url must be http:// or https://"));
                }
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("sha256 must be 64 hex digits"));
                }
                Ok(())
            }
            (None, None, Some(r)) if oci_allowed => crate::oci::reference::parse(r).map(|_| ()),
            _ if oci_allowed => Err(bad("give url and sha256 (a bundle), or oci (a reference)")),
            _ => Err(bad("give url and sha256")),
        }
    }
}

/// What a bundle's `manifest.json` may say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Manifest {
    /// The kernel an image bundle boots with.
    #[serde(default)]
    pub kernel: Option<String>,
    /// A kernel bundle's release.
    #[serde(default)]
    pub version: Option<String>,
    /// An image bundle's service ports.
    #[serde(default)]
    pub ready_ports: Vec<u16>,
}

/// Downloads `url` into `dir/bundle.tar.zst`, hashing as it streams; fails unless the body
/// is complete and its sha256 is `sha256`. `progress` gets the fraction done when the size is
/// known. At most `max_bytes` are accepted.
pub async fn download(
    url: &str,
    sha256: &str,
    dir: &Path,
    max_bytes: u64,
    mut progress: impl FnMut(f64),
) -> Result<PathBuf> {
    let fail = |e: reqwest::Error| Error::failed(format!("Cannot download {url}"), e);
    let mut resp = reqwest::Client::new().get(url).send().await.map_err(fail)?;
    if !resp.status().is_success() {
        return Err(Error::failed(
            format!("Cannot download {url}"),
            std::io::Error::other(format!("HTTP {}", resp.status())),
        ));
    }
    let total = resp.content_length();
    if total.is_some_and(|t| t > max_bytes) {
        return Err(Error::InvalidArgument(format!(
            "{url} is {} bytes; at most {max_bytes} are accepted (max_image_bytes)",
            total.unwrap_or(0)
        )));
    }
    let path = dir.join("bundle.tar.zst");
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| Error::failed("Cannot store the bundle", e))?;
    let mut hash = Sha256::new();
    let mut got: u64 = 0;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                return Err(Error::InvalidArgument(format!(
                    "{url} ended after {got} of {} bytes ({e}); nothing was published",
                    total.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                )))
            }
        };
        got += chunk.len() as u64;
        if got > max_bytes {
            return Err(Error::InvalidArgument(format!(
                "{url} sends more than {max_bytes} bytes (max_image_bytes)"
            )));
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| Error::failed("Cannot store the bundle", e))?;
        if let Some(t) = total {
            progress(got as f64 / t.max(1) as f64);
        }
    }
    if total.is_some_and(|t| t != got) {
        return Err(Error::InvalidArgument(format!(
            "{url} ended after {got} of {} bytes; nothing was published",
            total.unwrap_or(0)
        )));
    }
    let actual = format!("{:x}", hash.finalize());
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(Error::InvalidArgument(format!(
            "{url} has sha256 {actual}, not the catalog's {sha256}; nothing was published"
        )));
    }
    // Every write has landed before anything reads the file.
    file.flush()
        .await
        .map_err(|e| Error::failed("Cannot store the bundle", e))?;
    Ok(path)
}

/// Unpacks a verified bundle into `dir/tree` with the hardened flattener (plain ownership:
/// everything root's). Returns the tree.
pub fn unpack(bundle: &Path, dir: &Path, max_bytes: u64) -> Result<PathBuf> {
    let tree = dir.join("tree");
    let f = std::fs::File::open(bundle).map_err(|e| Error::failed("Cannot open the bundle", e))?;
    let zst = zstd::stream::read::Decoder::new(f)
        .map_err(|e| Error::failed("Cannot read the bundle (zstd)", e))?;
    let limits = Limits {
        max_bytes,
        ..Limits::default()
    };
    let mut flat = Flattener::new(
        HostTree::create(&tree, false)
            .map_err(|e| Error::failed("Cannot create the bundle tree", e))?,
        limits,
    );
    flat.apply_layer(zst).map_err(|e| {
        Error::InvalidArgument(Error::failed("The bundle is not acceptable", e).full_message())
    })?;
    flat.finish()
        .map_err(|e| Error::failed("Cannot unpack the bundle", e))?;
    Ok(tree)
}

/// The bundle's `manifest.json` (defaults when it has none).
pub fn manifest(tree: &Path) -> Result<Manifest> {
    match std::fs::read(tree.join("manifest.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::InvalidArgument(format!("The bundle's manifest.json is not valid: {e}"))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(Error::failed("Cannot read the bundle's manifest.json", e)),
    }
}

/// A regular file of the tree (not a link or a directory), or `None` when absent.
pub fn regular(tree: &Path, name: &str) -> Result<Option<PathBuf>> {
    let p = tree.join(name);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_file() => Ok(Some(p)),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "The bundle's {name} is not a regular file"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::failed(format!("Cannot read the bundle's {name}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NameKind;

    fn entry(url: Option<&str>, sha: Option<&str>, oci: Option<&str>) -> CatalogEntry {
        CatalogEntry {
            name: "x".into(),
            url: url.map(Into::into),
            sha256: sha.map(Into::into),
            oci: oci.map(Into::into),
            description: String::new(),
        }
    }

    #[test]
    fn entries_are_a_bundle_or_a_reference() {
        let sha = "ab".repeat(32);
        entry(Some("http://h/k.tar.zst"), Some(&sha), None)
            .validate(NameKind::Kernel, false)
            .unwrap();
        entry(None, None, Some("docker.io/library/debian:bookworm"))
            .validate(NameKind::Image, true)
            .unwrap();
        assert!(entry(None, None, Some("docker.io/x:y"))
            .validate(NameKind::Kernel, false)
            .is_err());
        assert!(entry(Some("ftp://h/k"), Some(&sha), None)
            .validate(NameKind::Kernel, false)
            .is_err());
        assert!(entry(Some("http://h/k"), Some("abc"), None)
            .validate(NameKind::Kernel, false)
            .is_err());
        assert!(entry(Some("http://h/k"), None, None)
            .validate(NameKind::Image, true)
            .is_err());
    }
}
