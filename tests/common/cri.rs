//! A client of containerd's CRI (Kubernetes' `runtime.v1` API) for the tests, since neither
//! kubelet nor crictl is packaged here: the messages the tests send and read, written from
//! cri-api's `pkg/apis/runtime/v1/api.proto` (the field numbers are that file's; fields the
//! tests leave out are not declared), and gRPC's unary call over HTTP/2 on containerd's Unix
//! socket.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use http_body_util::BodyExt;

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    /// `SANDBOX_READY` 0, `SANDBOX_NOTREADY` 1.
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
    #[prost(string, tag = "9")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
}

/// `StopPodSandboxRequest`, `RemovePodSandboxRequest`: a pod sandbox's id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodId {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

/// A volume: a host path in the container.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mount {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    #[prost(bool, tag = "3")]
    pub readonly: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(message, repeated, tag = "7")]
    pub mounts: Vec<Mount>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerResponse {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

/// `StartContainerRequest`, `RemoveContainerRequest`, `ContainerStatsRequest`: a container's id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerId {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopContainerRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(int64, tag = "2")]
    pub timeout: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecSyncRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, repeated, tag = "2")]
    pub cmd: Vec<String>,
    #[prost(int64, tag = "3")]
    pub timeout: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecSyncResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub stdout: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub stderr: Vec<u8>,
    #[prost(int32, tag = "3")]
    pub exit_code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CpuUsage {
    #[prost(int64, tag = "1")]
    pub timestamp: i64,
    #[prost(message, optional, tag = "2")]
    pub usage_core_nano_seconds: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MemoryUsage {
    #[prost(int64, tag = "1")]
    pub timestamp: i64,
    #[prost(message, optional, tag = "2")]
    pub working_set_bytes: Option<UInt64Value>,
    #[prost(message, optional, tag = "4")]
    pub usage_bytes: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStats {
    #[prost(message, optional, tag = "2")]
    pub cpu: Option<CpuUsage>,
    #[prost(message, optional, tag = "3")]
    pub memory: Option<MemoryUsage>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatsResponse {
    #[prost(message, optional, tag = "1")]
    pub stats: Option<ContainerStats>,
}

/// An empty reply (`StopPodSandboxResponse`, `RemovePodSandboxResponse`, …).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// A failed call: gRPC's status code and message (or the transport's error, code -1).
#[derive(Debug, Clone)]
pub struct Status {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gRPC status {}: {}", self.code, self.message)
    }
}

/// A pod's configuration: its name (also its host name) and uid, in namespace `default`.
pub fn pod_config(name: &str, uid: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        ..Default::default()
    }
}

/// A container's configuration: its name, image, command (the image's Entrypoint's stead) and
/// arguments.
pub fn container_config(name: &str, image: &str, command: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
        }),
        command: vec![command.into()],
        args: args.iter().map(|a| a.to_string()).collect(),
        mounts: Vec::new(),
    }
}

/// containerd's CRI on its gRPC socket.
pub struct Cri {
    socket: PathBuf,
}

impl Cri {
    pub fn new(socket: &Path) -> Cri {
        Cri {
            socket: socket.to_owned(),
        }
    }

    /// One unary call of `runtime.v1.<service>/<method>`: a connection of its own, the
    /// request in gRPC's framing (no compression), the reply's status from its trailers (or
    /// its headers, for a reply without a body).
    pub async fn call<Q: prost::Message, R: prost::Message + Default>(
        &self,
        service: &str,
        method: &str,
        req: &Q,
    ) -> Result<R, Status> {
        let transport = |e: &dyn std::fmt::Display| Status {
            code: -1,
            message: e.to_string(),
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| transport(&e))?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| transport(&e))?;
        let driver = tokio::spawn(conn);
        let body = req.encode_to_vec();
        let mut framed = Vec::with_capacity(body.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        let request =
            hyper::Request::post(format!("http://localhost/runtime.v1.{service}/{method}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
                .map_err(|e| transport(&e))?;
        let reply = sender
            .send_request(request)
            .await
            .map_err(|e| transport(&e))?;
        let headers = reply.headers().clone();
        let collected = reply
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&e))?;
        driver.abort();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            trailers
                .get(name)
                .or_else(|| headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let code: i32 = field("grpc-status")
            .and_then(|c| c.parse().ok())
            .unwrap_or(-1);
        if code != 0 {
            return Err(Status {
                code,
                message: field("grpc-message").unwrap_or_else(|| "no grpc-status".into()),
            });
        }
        let data = collected.to_bytes();
        if data.len() < 5 || data[0] != 0 {
            return Err(transport(&format!(
                "a reply of {} bytes, not one message",
                data.len()
            )));
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let msg = data
            .get(5..5 + len)
            .ok_or_else(|| transport(&"a cut reply"))?;
        R::decode(msg).map_err(|e| transport(&e))
    }

    /// A RuntimeService call whose request is a container's id alone (StartContainer,
    /// RemoveContainer, ContainerStats).
    pub async fn on_container<R: prost::Message + Default>(
        &self,
        method: &str,
        id: &str,
    ) -> Result<R, Status> {
        let req = ContainerId {
            container_id: id.to_owned(),
        };
        self.runtime(method, &req).await
    }

    /// RunPodSandbox of `config` with runtime handler `handler`: the sandbox's id.
    pub async fn run_pod(
        &self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, Status> {
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let r: RunPodSandboxResponse = self.runtime("RunPodSandbox", &req).await?;
        Ok(r.pod_sandbox_id)
    }

    /// CreateContainer of `config` in pod `pod` (made with `sandbox`): the container's id.
    pub async fn create_container(
        &self,
        pod: &str,
        sandbox: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String, Status> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let r: CreateContainerResponse = self.runtime("CreateContainer", &req).await?;
        Ok(r.container_id)
    }

    /// A RuntimeService call whose request is a pod sandbox's id alone (StopPodSandbox,
    /// RemovePodSandbox).
    pub async fn on_pod<R: prost::Message + Default>(
        &self,
        method: &str,
        id: &str,
    ) -> Result<R, Status> {
        let req = PodId {
            pod_sandbox_id: id.to_owned(),
        };
        self.runtime(method, &req).await
    }

    pub async fn image<Q: prost::Message, R: prost::Message + Default>(
        &self,
        method: &str,
        req: &Q,
    ) -> Result<R, Status> {
        self.call("ImageService", method, req).await
    }

    pub async fn runtime<Q: prost::Message, R: prost::Message + Default>(
        &self,
        method: &str,
        req: &Q,
    ) -> Result<R, Status> {
        self.call("RuntimeService", method, req).await
    }
}
