//! Benchmark helper: how long a Kubernetes pod takes to be usable through containerd's CRI,
//! as kubelet drives it: RunPodSandbox, CreateContainer and StartContainer of one container,
//! then the first ExecSync in it returning (`true`); the image is pulled first and the pod is
//! stopped and removed after each run, outside the timing. Prints one line per run, in seconds.
//! Run: `cri-pod SOCKET HANDLER IMAGE RUNS` (containerd's gRPC socket, the CRI runtime handler,
//! an image present in containerd whose `/bin/sleep` the container runs). `tests/bench/containerd`
//! runs it against banger's handler and runc's.

#[path = "../tests/common/cri.rs"]
mod cri;

use cri::*;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, handler, image, runs] = &args[..] else {
        eprintln!("usage: cri-pod SOCKET HANDLER IMAGE RUNS");
        std::process::exit(2);
    };
    let runs: u32 = runs.parse().expect("RUNS is a number");
    let cri = Cri::new(std::path::Path::new(socket));
    let fail = |what: &str, e: Status| -> ! {
        eprintln!("cri-pod: {what}: {e}");
        std::process::exit(1)
    };
    // The container's image, pulled through CRI once (into containerd's k8s.io namespace).
    let _: PullImageResponse = cri
        .image(
            "PullImage",
            &PullImageRequest {
                image: Some(ImageSpec {
                    image: image.clone(),
                }),
                sandbox_config: None,
            },
        )
        .await
        .unwrap_or_else(|e| fail("PullImage", e));
    for i in 0..runs {
        let name = format!("bench-{handler}-{i}");
        let config = pod_config(&name, &name);
        let t0 = std::time::Instant::now();
        let pod = cri
            .run_pod(&config, handler)
            .await
            .unwrap_or_else(|e| fail("RunPodSandbox", e));
        let made = cri
            .create_container(
                &pod,
                &config,
                container_config("main", image, "/bin/sleep", &["300"]),
            )
            .await
            .unwrap_or_else(|e| fail("CreateContainer", e));
        let _: Empty = cri
            .on_container("StartContainer", &made)
            .await
            .unwrap_or_else(|e| fail("StartContainer", e));
        let r: ExecSyncResponse = cri
            .runtime(
                "ExecSync",
                &ExecSyncRequest {
                    container_id: made.clone(),
                    cmd: vec!["true".into()],
                    timeout: 60,
                },
            )
            .await
            .unwrap_or_else(|e| fail("ExecSync", e));
        let took = t0.elapsed();
        if r.exit_code != 0 {
            eprintln!("cri-pod: true exited {}", r.exit_code);
            std::process::exit(1);
        }
        println!("{:.2}", took.as_secs_f64());
        for method in ["StopPodSandbox", "RemovePodSandbox"] {
            let _: Empty = cri
                .on_pod(method, &pod)
                .await
                .unwrap_or_else(|e| fail(method, e));
        }
    }
}
