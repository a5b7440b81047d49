//! `BuildImage`: a Debian image made with debootstrap from the host's own apt mirror
//! (minbase + systemd-sysv, openssh-server, iproute2, udev, ca-certificates and the caller's
//! packages). The build log is kept under `logs/`; SSH host keys are removed so that no two
//! VMs share them (a guest unit generates fresh ones at first boot).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{failed, invalid, ImageError};
use super::finish::{blocking, TreeImage};
use super::publish::Staging;
use super::{BuildOptions, Images};
use crate::auth::Action;
use crate::jobs::{Job, JobSpec};
use crate::model::{new_id, validate_name, NameKind, SYSTEM_UID};
use crate::{host, Result};

/// What every built image has.
/// The built-in catalog image, made by `BuildImage` (and `PullImage debian-bookworm`).
pub const DEFAULT_IMAGE: &str = "debian-bookworm";

const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "openssh-server",
    "iproute2",
    "udev",
    "ca-certificates",
];

fn word_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
        && !s.starts_with('-')
}

/// The Debian mirror in the host's apt sources (deb822 `.sources` or one-line lists).
pub fn host_mirror() -> Result<String> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path()) {
                texts.push(t);
            }
        }
    }
    for t in &texts {
        for line in t.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let candidates: Vec<&str> = if let Some(u) = line.strip_prefix("URIs:") {
                u.split_whitespace().collect()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace()
                    .filter(|w| w.contains("://"))
                    .take(1)
                    .collect()
            } else {
                Vec::new()
            };
            if let Some(u) = candidates
                .into_iter()
                .find(|u| u.trim_end_matches('/').ends_with("/debian"))
            {
                return Ok(u.to_owned());
            }
        }
    }
    Err(ImageError::NoMirror.into())
}

fn run_debootstrap(suite: &str, packages: &[String], tree: &Path, log: &Path) -> Result<()> {
    let mirror = host_mirror()?;
    let include = BASE_PACKAGES
        .iter()
        .map(|s| s.to_string())
        .chain(packages.iter().cloned())
        .collect::<Vec<_>>()
        .join(",");
    let program = host::find_program("debootstrap").ok_or_else(|| {
        failed(
            "debootstrap is not installed",
            std::io::Error::other("apt-get install debootstrap"),
        )
    })?;
    let logf = std::fs::File::create(log).map_err(|e| failed("Cannot create the build log", e))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(["--variant=minbase", &format!("--include={include}"), suite])
        .arg(tree)
        .arg(&mirror)
        .stdin(std::process::Stdio::null())
        .stdout(
            logf.try_clone()
                .map_err(|e| failed("Cannot write the build log", e))?,
        )
        .stderr(logf);
    // A cancel kills debootstrap and everything it started (dpkg, its scripts) together.
    let status = host::output(&mut cmd, "debootstrap")?.status;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(failed(
            format!(
                "debootstrap failed ({status}); the log is {}",
                log.display()
            ),
            std::io::Error::other(tail.into_iter().rev().collect::<Vec<_>>().join(" | ")),
        ));
    }
    // What a published image would not carry: downloaded packages, apt lists, host keys.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        if let Ok(entries) = std::fs::read_dir(tree.join(dir)) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(tree.join("etc/ssh")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The uid (and gid) of a built image's account.
pub const USER_UID: u32 = 1000;

/// Accepts an account name: a lowercase letter or `_`, then up to 31 of lowercase letters,
/// digits, `_` and `-`.
fn user_ok(u: &str) -> bool {
    let mut c = u.chars();
    matches!(c.next(), Some('a'..='z' | '_'))
        && u.len() <= 32
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Appends `line` to the tree's `file` (made if absent).
fn append(tree: &Path, file: &str, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tree.join(file))?;
    writeln!(f, "{line}")
}

/// Makes account `user` in a freshly debootstrapped tree: uid and gid [`USER_UID`], bash, a
/// home made from `/etc/skel`, member of `sudo` with passwordless sudo when the image has
/// sudo, its password locked. The image's configuration then makes it the default user, in
/// its home.
fn add_user(tree: &Path, user: &str) -> std::io::Result<crate::model::ImageConfig> {
    let passwd = std::fs::read_to_string(tree.join("etc/passwd"))?;
    if passwd
        .lines()
        .any(|l| l.starts_with(&format!("{user}:")) || l.split(':').nth(2) == Some("1000"))
    {
        return Err(std::io::Error::other(format!(
            "the image has a user {user} or a uid {USER_UID} already"
        )));
    }
    let home = format!("/home/{user}");
    append(
        tree,
        "etc/passwd",
        &format!("{user}:x:{USER_UID}:{USER_UID}::{home}:/bin/bash"),
    )?;
    append(tree, "etc/group", &format!("{user}:x:{USER_UID}:"))?;
    append(tree, "etc/shadow", &format!("{user}:!:19000:0:99999:7:::"))?;
    let sudo = tree.join("usr/bin/sudo").exists();
    if sudo {
        let group = std::fs::read_to_string(tree.join("etc/group"))?;
        let group: String = group
            .lines()
            .map(|l| {
                if l.starts_with("sudo:") {
                    let sep = if l.ends_with(':') { "" } else { "," };
                    format!("{l}{sep}{user}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(tree.join("etc/group"), group)?;
        let rule = tree.join(format!("etc/sudoers.d/{user}"));
        std::fs::write(&rule, format!("{user} ALL=(ALL:ALL) NOPASSWD: ALL\n"))?;
        std::fs::set_permissions(&rule, std::os::unix::fs::PermissionsExt::from_mode(0o440))?;
    }
    let dir = tree.join(home.trim_start_matches('/'));
    std::fs::create_dir_all(&dir)?;
    if let Ok(skel) = std::fs::read_dir(tree.join("etc/skel")) {
        for e in skel.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::copy(e.path(), dir.join(e.file_name()))?;
                std::os::unix::fs::lchown(dir.join(e.file_name()), Some(USER_UID), Some(USER_UID))?;
            }
        }
    }
    std::os::unix::fs::lchown(&dir, Some(USER_UID), Some(USER_UID))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o750))?;
    Ok(crate::model::ImageConfig {
        user: user.to_owned(),
        working_dir: home,
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..Default::default()
    })
}

impl Images {
    /// Builds image `name` with debootstrap, as a job.
    pub async fn build(&self, uid: u32, name: &str, opts: BuildOptions) -> Result<Arc<Job>> {
        validate_name(NameKind::Image, name)?;
        let suite = opts.suite.clone().unwrap_or_else(|| "bookworm".into());
        if !word_ok(&suite) {
            return Err(invalid(format!(
                "Invalid suite {suite:?}; use e.g. bookworm"
            )));
        }
        if let Some(bad) = opts.packages.iter().find(|p| !word_ok(p)) {
            return Err(invalid(format!("Invalid package name {bad:?}")));
        }
        if let Some(u) = opts.user.as_deref().filter(|u| !user_ok(u) || *u == "root") {
            return Err(invalid(format!(
                "Invalid user {u:?}: a lowercase letter or _, then up to 31 lowercase letters, \
                 digits, _ or -, and not root"
            )));
        }
        // The default image's name is the system's: built by anyone with its own recipe,
        // it is the system's image; a member's own recipe goes under a name of their own.
        let owner = if self.reserved(name) { SYSTEM_UID } else { uid };
        if owner == SYSTEM_UID && uid != SYSTEM_UID && !opts.is_default_recipe() {
            return Err(ImageError::Reserved(format!(
                "{name:?} is the system's image name; it is built only with the default recipe \
                 (no suite, packages, kernel or ready ports): build yours under another name"
            ))
            .into());
        }
        self.check_name_free(name, owner, "delete it first or pick another name")
            .await?;
        let spec = JobSpec {
            kind: "build-image".into(),
            target: name.into(),
            action: Action::ImagesManage,
            owner_uid: uid,
        };
        let (this, name) = (self.clone(), name.to_owned());
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            let id = new_id();
            let staging = Staging::create(
                this.layout
                    .images_dir()
                    .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
            )?;
            let dir = staging.path().to_owned();
            // A bookworm base with systemd and sshd is about 300 MB.
            let (tree, scratch) = this.tree_dir(&id, &dir, 1 << 30)?;
            let logs = this.layout.state_dir.join("logs");
            std::fs::create_dir_all(&logs)
                .map_err(|e| failed("Cannot create the log directory", e))?;
            let log: PathBuf = logs.join(format!("build-{name}-{id}.log"));
            ctx.stage(
                "debootstrap",
                format!("debootstrap {suite} (log: {})", log.display()),
            );
            ctx.progress(0.05);
            let (t, l, s, p, u) = (
                tree.clone(),
                log.clone(),
                suite.clone(),
                opts.packages.clone(),
                opts.user.clone(),
            );
            let config = blocking("debootstrap", move || {
                run_debootstrap(&s, &p, &t, &l)?;
                match u {
                    Some(u) => add_user(&t, &u)
                        .map_err(|e| failed(format!("Cannot make the account {u}"), e)),
                    None => Ok(Default::default()),
                }
            })
            .await?;
            let t = TreeImage {
                id,
                name,
                source: format!("debootstrap:{suite}"),
                kernel: opts.kernel,
                size: opts.size,
                ready_ports: opts.ready_ports,
                config,
                owner_uid: owner,
            };
            this.finish_tree(&ctx, staging, tree, scratch, t)
                .await
                .map(|_| ())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_made_with_its_home_and_sudo() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        for dir in ["etc/sudoers.d", "etc/skel", "usr/bin", "home"] {
            std::fs::create_dir_all(t.join(dir)).unwrap();
        }
        std::fs::write(t.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::write(t.join("etc/group"), "root:x:0:\nsudo:x:27:\n").unwrap();
        std::fs::write(t.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        std::fs::write(t.join("etc/skel/.bashrc"), "# bashrc\n").unwrap();
        std::fs::write(t.join("usr/bin/sudo"), "").unwrap();
        let c = add_user(t, "user").unwrap();
        assert_eq!(
            (c.user.as_str(), c.working_dir.as_str()),
            ("user", "/home/user")
        );
        let passwd = std::fs::read_to_string(t.join("etc/passwd")).unwrap();
        assert!(
            passwd.contains("user:x:1000:1000::/home/user:/bin/bash"),
            "{passwd}"
        );
        let group = std::fs::read_to_string(t.join("etc/group")).unwrap();
        assert!(
            group.contains("sudo:x:27:user\n") && group.contains("user:x:1000:"),
            "{group}"
        );
        let rule = std::fs::read_to_string(t.join("etc/sudoers.d/user")).unwrap();
        assert_eq!(rule, "user ALL=(ALL:ALL) NOPASSWD: ALL\n");
        use std::os::unix::fs::MetadataExt;
        let home = std::fs::metadata(t.join("home/user")).unwrap();
        assert_eq!((home.uid(), home.gid()), (1000, 1000));
        assert!(t.join("home/user/.bashrc").exists());
        let again = add_user(t, "user").unwrap_err().to_string();
        assert!(again.contains("already"), "{again}");
        assert!(user_ok("user") && user_ok("_svc-1") && !user_ok("User") && !user_ok("1x"));
    }

    #[test]
    fn suites_and_packages_are_plain_words() {
        assert!(word_ok("bookworm") && word_ok("g++") && word_ok("libc6.1"));
        assert!(!word_ok("") && !word_ok("--force") && !word_ok("a b") && !word_ok("Foo"));
    }
}
