//! How a guest process is started the way its image says (`Env`, `WorkingDir`, `User` of the
//! OCI configuration, kept at [`crate::model::ImageConfig::GUEST_PATH`]), overridable per
//! process: what the agent's `exec` and banger-init's main process share.

use std::path::Path;

use crate::model::ImageConfig;

/// The image's run settings as the guest holds them (the empty config when absent).
pub fn image_config(root: &Path) -> ImageConfig {
    std::fs::read(root.join(ImageConfig::GUEST_PATH))
        .ok()
        .filter(|b| b.len() <= ImageConfig::MAX_BYTES)
        .map(|b| ImageConfig::from_json(&String::from_utf8_lossy(&b)))
        .unwrap_or_default()
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Name for `USER`/`LOGNAME` (the number when the image has no entry).
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: String,
    /// Login shell (`/bin/sh` when the image names none).
    pub shell: String,
}

/// `/etc/passwd`- or `/etc/group`-style entries: `(name, id, fields)`.
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
}

/// Resolves an OCI `User` (`user`, `uid`, `user:group`, `uid:gid`; empty for root) against
/// the guest's `/etc/passwd` and `/etc/group` under `root`, as Docker does: a numeric uid
/// with no entry runs with gid 0 and home `/`.
pub fn resolve_user(spec: &str, root: &Path) -> Result<Identity, String> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "root" } else { user };
    let numeric = user.parse::<u32>().ok();
    let entry = entries(&passwd)
        .find(|f| f[0] == user || (numeric.is_some() && f[2].parse::<u32>().ok() == numeric));
    let mut id = match (entry, user.parse::<u32>()) {
        (Some(f), _) => Identity {
            name: f[0].to_owned(),
            uid: f[2]
                .parse()
                .map_err(|_| format!("user {user}: bad uid in /etc/passwd"))?,
            gid: f[3]
                .parse()
                .map_err(|_| format!("user {user}: bad gid in /etc/passwd"))?,
            groups: Vec::new(),
            home: f
                .get(5)
                .filter(|h| !h.is_empty())
                .unwrap_or(&"/")
                .to_string(),
            shell: f
                .get(6)
                .filter(|s| !s.is_empty() && root.join(s.trim_start_matches('/')).exists())
                .unwrap_or(&"/bin/sh")
                .to_string(),
        },
        (None, Ok(uid)) => Identity {
            name: uid.to_string(),
            uid,
            gid: 0,
            groups: Vec::new(),
            home: "/".into(),
            shell: "/bin/sh".into(),
        },
        (None, Err(_)) if user == "root" => Identity {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: "/root".into(),
            shell: "/bin/sh".into(),
        },
        (None, Err(_)) => {
            return Err(format!(
                "user {user:?} is not in the image's /etc/passwd; give a uid or a user it has"
            ))
        }
    };
    if let Some(g) = grp {
        id.gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entries(&group)
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        };
    }
    // Supplementary groups: the primary one and every group that lists the user.
    id.groups = std::iter::once(id.gid)
        .chain(
            entries(&group)
                .filter(|f| f[3].split(',').any(|m| m == id.name))
                .filter_map(|f| f[2].parse().ok()),
        )
        .collect();
    id.groups.dedup();
    Ok(id)
}

/// The environment of a guest process: banger's defaults, then the image's `Env`, then
/// `extra` (`KEY=VALUE`, later wins).
pub fn environment(
    who: &Identity,
    image_env: &[String],
    extra: &[String],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), super::supervise::PATH.into()),
        ("HOME".into(), who.home.clone()),
        ("USER".into(), who.name.clone()),
        ("LOGNAME".into(), who.name.clone()),
        ("TERM".into(), "dumb".into()),
    ];
    for kv in image_env.iter().chain(extra) {
        if let Some((k, v)) = kv.split_once('=') {
            env.retain(|(key, _)| key != k);
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    env
}

/// The working directory: `requested`, else the image's, else the user's home if it exists,
/// else `/`.
pub fn working_dir(requested: Option<&str>, image: &str, who: &Identity) -> String {
    match requested.filter(|d| !d.is_empty()) {
        Some(d) => d.to_owned(),
        None if !image.is_empty() => image.to_owned(),
        None if Path::new(&who.home).is_dir() => who.home.clone(),
        None => "/".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_as_docker_does() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\n",
        )
        .unwrap();
        let root = resolve_user("", d.path()).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let app = resolve_user("app", d.path()).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups.clone()),
            (1000, 1000, vec![1000, 50])
        );
        assert_eq!(app.home, "/home/app");
        assert_eq!(resolve_user("1000", d.path()).unwrap().name, "app");
        let n = resolve_user("4242:staff", d.path()).unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 50, "/"));
        assert!(resolve_user("nobody-here", d.path())
            .unwrap_err()
            .contains("/etc/passwd"));
        assert!(resolve_user("app:nogroup", d.path())
            .unwrap_err()
            .contains("/etc/group"));

        let env = environment(
            &app,
            &["PATH=/app/bin".into(), "A=1".into()],
            &["A=2".into()],
        );
        assert!(env.contains(&("PATH".into(), "/app/bin".into())));
        assert!(env.contains(&("A".into(), "2".into())));
        assert!(env.contains(&("HOME".into(), "/home/app".into())));
        assert_eq!(working_dir(None, "/srv", &app), "/srv");
        assert_eq!(working_dir(Some("/tmp"), "/srv", &app), "/tmp");
    }
}
