//! What guest and host both know of an image: its OCI run settings.

/// The run settings of an OCI image configuration (`config` of the image config blob), kept
/// with the image and in its root filesystem at [`ImageConfig::GUEST_PATH`] for the guest's
/// agent and init.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// `KEY=VALUE` environment.
    #[serde(rename = "Env")]
    pub env: Vec<String>,
    /// The working directory; empty for the default.
    #[serde(rename = "WorkingDir")]
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty for root.
    #[serde(rename = "User")]
    pub user: String,
    /// The entrypoint.
    #[serde(rename = "Entrypoint")]
    pub entrypoint: Vec<String>,
    /// The command (the entrypoint's arguments when there is one).
    #[serde(rename = "Cmd")]
    pub cmd: Vec<String>,
}

impl ImageConfig {
    /// Where images carry it (written when banger builds their root filesystem).
    pub const GUEST_PATH: &'static str = "etc/banger/image.json";
    /// At most this much of an image configuration is kept.
    pub const MAX_BYTES: usize = 64 * 1024;

    /// The `config` of an OCI image configuration blob (absent parts empty).
    pub fn from_oci(blob: &serde_json::Value) -> Self {
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let c = &blob["config"];
        ImageConfig {
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_owned(),
            user: c["User"].as_str().unwrap_or_default().to_owned(),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
        }
    }

    /// Entrypoint + Cmd: the image's main process.
    pub fn main_argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// As stored (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From storage; empty or unreadable text is the empty config.
    pub fn from_json(s: &str) -> Self {
        serde_json::from_str(s).unwrap_or_default()
    }
}
