//! `banger status`.

use serde_json::json;

use super::{explain, Output};
use crate::dbus::proxy::{Images1Proxy, Jobs1Proxy, Kernels1Proxy, VMs1Proxy};

/// Prints the daemon's version and counts.
pub async fn run(out: &Output, conn: &zbus::Connection) -> anyhow::Result<()> {
    let jobs = Jobs1Proxy::new(conn).await?;
    let version = jobs.version().await.map_err(explain)?;
    let images = Images1Proxy::new(conn)
        .await?
        .list_images()
        .await
        .map_err(explain)?;
    let kernels = Kernels1Proxy::new(conn)
        .await?
        .list_kernels()
        .await
        .map_err(explain)?;
    let vm_proxy = VMs1Proxy::new(conn).await?;
    let vms = vm_proxy.list_vms().await.map_err(explain)?;
    let usage = vm_proxy.get_usage().await.map_err(explain)?;
    let running = vms.iter().filter(|v| v.2 == "running").count();
    let jobs = jobs.list_jobs().await.map_err(explain)?;
    let counts = [images.len(), kernels.len(), vms.len(), running, jobs.len()];
    print(out, &version, counts, &usage);
    Ok(())
}

/// Prints the status: the daemon's version, its counts of images, kernels, VMs, running VMs
/// and jobs, and the caller's use against each quota as `your_<quota>`: `USED of ALLOWED`
/// (whichever way they were asked).
pub(super) fn print(out: &Output, version: &str, counts: [usize; 5], usage: &[(String, u64, u64)]) {
    let [images, kernels, vms, running, jobs] = counts;
    let mut fields = vec![
        ("daemon_version".to_owned(), json!(version)),
        ("cli_version".to_owned(), json!(crate::VERSION)),
        ("images".to_owned(), json!(images)),
        ("kernels".to_owned(), json!(kernels)),
        ("vms".to_owned(), json!(vms)),
        ("running_vms".to_owned(), json!(running)),
        ("jobs".to_owned(), json!(jobs)),
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
