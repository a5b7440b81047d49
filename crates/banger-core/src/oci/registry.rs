//! Registry pulls into the blob cache (`cache/oci/sha256/<hex>`): each blob streamed to a
//! staging file while hashing, its size and digest checked against the descriptor, then
//! renamed into place, so the cache only ever holds verified blobs and a later pull reuses
//! them without touching the network.

use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

use futures_util::StreamExt;
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use super::error::{failed, invalid};
use crate::layout::STAGING_PREFIX;
use crate::Result;

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// The compression of a layer media type; unknown types are refused.
pub fn layer_compression(media_type: &str) -> Result<Compression> {
    Ok(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
        other => {
            return Err(invalid(format!(
                "Unsupported layer media type {other:?}: banger reads tar, tar+gzip and tar+zstd layers"
            )))
        }
    })
}

/// A registry client for anonymous pulls.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
}

/// The digest's hex part, checked to be sha256.
fn sha256_hex(digest: &str) -> Result<&str> {
    match digest.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex)
        }
        _ => Err(invalid(format!(
            "Unsupported or malformed digest {digest:?}"
        ))),
    }
}

/// Whether a registry host (`HOST[:PORT]`) is this machine's loopback: `localhost` or a
/// loopback address.
pub fn on_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Registry {
    /// A client; `insecure` allows plain HTTP to the registry; `creds` log in (basic, or
    /// the token flow the registry asks for), else anonymously.
    pub fn new(insecure: bool, creds: Option<super::auth::Credentials>) -> Self {
        let config = ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            // Offline or a host that does not answer: fail in seconds, not minutes. A read
            // bound is on silence, not on a whole blob.
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        Registry {
            client: Client::new(config),
            auth: match creds {
                Some(c) => RegistryAuth::Basic(c.user, c.password),
                None => RegistryAuth::Anonymous,
            },
        }
    }

    /// The linux/amd64 image manifest of `r` and its digest.
    pub async fn manifest(&self, r: &Reference) -> Result<(OciImageManifest, String)> {
        self.client
            .pull_image_manifest(r, &self.auth)
            .await
            .map_err(|e| {
                let text = e.to_string();
                let lower = text.to_lowercase();
                if text.contains("401")
                    || lower.contains("unauthorized")
                    || lower.contains("not authorized")
                {
                    let host = r.registry();
                    let how = if matches!(self.auth, RegistryAuth::Anonymous) {
                        // Docker Hub answers 401 for a repository that does not exist too.
                        format!(
                            "check the name (a registry may answer so for a repository that \
                             does not exist), or log in first (`podman login {host}` or \
                             `docker login {host}`; the CLI passes those credentials), pass \
                             PullImage's auth option, or have the operator add {host} to \
                             /etc/banger/auth.json"
                        )
                    } else {
                        "the credentials given were refused; check them".to_owned()
                    };
                    return failed(
                        format!(
                            "Registry {host} refused access to {} (401 Unauthorized): {how}",
                            r.whole()
                        ),
                        e,
                    );
                }
                failed(format!("Cannot fetch the manifest of {}", r.whole()), e)
            })
    }

    /// Makes sure `desc`'s blob is in the cache, fetching it when missing; calls `progress`
    /// with bytes fetched so far. Returns the cached path.
    pub async fn fetch_blob(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        cache: &Path,
        progress: impl FnMut(u64),
    ) -> Result<PathBuf> {
        self.fetch_blob_tee(r, desc, cache, progress, None).await
    }

    /// The blob's path in the cache when it is there already.
    pub fn cached(desc: &OciDescriptor, cache: &Path) -> Result<Option<PathBuf>> {
        let p = cache.join("sha256").join(sha256_hex(&desc.digest)?);
        Ok(p.exists().then_some(p))
    }

    /// [`Registry::fetch_blob`], handing each chunk to `tee` as well while it arrives (a
    /// consumer that reads the blob as it downloads; the chunks are not verified yet, so
    /// what it makes of them counts only once this returns Ok). A consumer that goes away
    /// stops getting chunks; the download goes on into the cache.
    pub async fn fetch_blob_tee(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        cache: &Path,
        mut progress: impl FnMut(u64),
        tee: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    ) -> Result<PathBuf> {
        let hex = sha256_hex(&desc.digest)?;
        let dir = cache.join("sha256");
        let final_path = dir.join(hex);
        if final_path.exists() {
            progress(desc.size.max(0) as u64);
            return Ok(final_path);
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| failed("Cannot create the blob cache", e))?;
        let expected = u64::try_from(desc.size)
            .map_err(|_| invalid(format!("Blob {} has a negative size", desc.digest)))?;
        // Unique per download: concurrent pulls may fetch the same blob; the last rename wins
        // and both wrote verified bytes.
        let staging = dir.join(format!("{STAGING_PREFIX}{hex}-{}", crate::model::new_id()));
        let result = self
            .download(r, desc, &staging, (expected, hex), &mut progress, tee)
            .await;
        match result {
            Ok(()) => tokio::fs::rename(&staging, &final_path)
                .await
                .map(|()| final_path)
                .map_err(|e| failed("Cannot publish a blob into the cache", e)),
            Err(e) => {
                let _ = tokio::fs::remove_file(&staging).await;
                Err(e)
            }
        }
    }

    async fn download(
        &self,
        r: &Reference,
        desc: &OciDescriptor,
        staging: &Path,
        (expected, hex): (u64, &str),
        progress: &mut impl FnMut(u64),
        mut tee: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    ) -> Result<()> {
        let mut stream = self
            .client
            .pull_blob_stream(r, desc)
            .await
            .map_err(|e| failed(format!("Cannot fetch blob {}", desc.digest), e))?;
        // Written through tokio's file (the blocking pool), never on an async worker.
        let mut file = tokio::fs::File::create(staging)
            .await
            .map_err(|e| failed("Cannot write the blob cache", e))?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let mismatch = |actual: &str| {
            invalid(format!(
                "Blob {} does not match its digest (got sha256:{actual}); the registry or image is corrupt",
                desc.digest
            ))
        };
        while let Some(chunk) = stream.stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // The client verifies too and fails the stream at its end; say why plainly.
                Err(e) if got == expected => {
                    let actual = crate::model::hex(&hasher.finalize());
                    if actual != hex {
                        return Err(mismatch(&actual));
                    }
                    return Err(failed(format!("Download of {} failed", desc.digest), e));
                }
                Err(e) => return Err(failed(format!("Download of {} broke off", desc.digest), e)),
            };
            got += chunk.len() as u64;
            // Stop as soon as the registry sends more than the descriptor promised.
            if got > expected {
                return Err(invalid(format!(
                    "Blob {} is larger than the {expected} bytes its descriptor states; the registry or image is corrupt",
                    desc.digest
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| failed("Cannot write the blob cache", e))?;
            if let Some(t) = &tee {
                if t.send(chunk.to_vec()).await.is_err() {
                    tee = None;
                }
            }
            progress(got);
        }
        if got != expected {
            return Err(invalid(format!(
                "Blob {} has {got} bytes, its descriptor states {expected}",
                desc.digest
            )));
        }
        let actual = crate::model::hex(&hasher.finalize());
        if actual != hex {
            return Err(mismatch(&actual));
        }
        file.flush()
            .await
            .map_err(|e| failed("Cannot write the blob cache", e))?;
        file.sync_all()
            .await
            .map_err(|e| failed("Cannot write the blob cache", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_plain_http_by_default() {
        for r in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(on_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "registry.example:5000",
            "10.0.0.1:5000",
            "[2001:db8::1]:5000",
        ] {
            assert!(!on_loopback(r), "{r}");
        }
    }

    #[test]
    fn media_types_map_to_compression() {
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Gzip
        );
        let e = layer_compression("application/vnd.example.weird").unwrap_err();
        assert!(e.to_string().contains("Unsupported layer media type"));
    }

    #[test]
    fn digests_must_be_sha256() {
        assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(sha256_hex("sha512:abc").is_err());
        assert!(sha256_hex("sha256:../../etc").is_err());
    }
}
