//! `banger status`.

use serde_json::json;

use super::transport::Transport;
use super::Output;

/// Prints the daemon's version and counts.
pub(crate) async fn run(out: &Output, t: &mut impl Transport) -> anyhow::Result<()> {
    let version = t.version().await?;
    let (images, kernels) = (t.images().await?.len(), t.kernels().await?.len());
    let vms = t.vms(&Default::default()).await?;
    let running = vms.iter().filter(|v| v["state"] == "running").count();
    let jobs = t.jobs().await?.len();
    let usage = t.usage().await?;
    let memory = t.host_memory(&vms).await?;
    print(
        out,
        &version,
        [images, kernels, vms.len(), running, jobs],
        memory,
        &usage,
    );
    Ok(())
}

/// Prints the status: the daemon's version, its counts of images, kernels, VMs, running VMs
/// and jobs, what the VMs cost the host in memory (MiB), and the caller's use against each quota as `your_<quota>`: `USED of ALLOWED`
/// (whichever way they were asked).
fn print(
    out: &Output,
    version: &str,
    counts: [usize; 5],
    host_memory: u64,
    usage: &[(String, u64, u64)],
) {
    let [images, kernels, vms, running, jobs] = counts;
    let mut fields = vec![
        ("daemon_version".to_owned(), json!(version)),
        ("cli_version".to_owned(), json!(crate::VERSION)),
        ("images".to_owned(), json!(images)),
        ("kernels".to_owned(), json!(kernels)),
        ("vms".to_owned(), json!(vms)),
        ("running_vms".to_owned(), json!(running)),
        ("jobs".to_owned(), json!(jobs)),
        ("vms_host_memory_mib".to_owned(), json!(host_memory >> 20)),
    ];
    for (quota, used, allowed) in usage {
        fields.push((
            format!("your_{quota}"),
            json!(format!("{used} of {allowed}")),
        ));
    }
    out.object(
        fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect(),
    );
}
