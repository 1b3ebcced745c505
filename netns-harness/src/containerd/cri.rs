//! A kubelet's end of the CRI runtime service, as much as pod networking
//! needs: run, inspect, stop and remove pod sandboxes (the `k8s-cri` crate's
//! v1 bindings over the runtime's unix socket).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::scratch::unique;

/// What a CRI call answers: its value, or the runtime's status (code and
/// message, e.g. a CNI plugin's error for a failed RunPodSandbox).
pub type CriResult<T> = Result<T, Status>;

/// How long one call may take; ADDs of many pods at once on two cores are slow.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A pod as the kubelet describes it in a PodSandboxConfig.
#[derive(Debug, Clone)]
pub struct PodConfig {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
}

impl PodConfig {
    /// A pod named `<tag>-<pid>-<n>` in `namespace`, without annotations.
    pub fn new(tag: &str, namespace: &str) -> PodConfig {
        let name = unique(tag);
        PodConfig {
            uid: format!("uid-{name}"),
            name,
            namespace: namespace.to_string(),
            annotations: BTreeMap::new(),
        }
    }

    /// Asks for secondary networks through `k8s.v1.cni.cncf.io/networks`.
    pub fn networks(mut self, annotation: &str) -> PodConfig {
        self.annotations
            .insert("k8s.v1.cni.cncf.io/networks".into(), annotation.to_string());
        self
    }
}

/// What PodSandboxStatus says of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    pub ready: bool,
    /// The pod IP (the cluster network's first address).
    pub ip: String,
    pub additional_ips: Vec<String>,
    /// The sandbox's netns, from the runtime spec in the verbose info.
    pub netns: Option<PathBuf>,
}

/// A CRI client on one runtime socket; every call blocks until answered.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// Every sandbox is created under this cgroup, which the fixture owns.
    cgroup_parent: String,
}

impl Cri {
    /// Connects to the runtime at `socket`; sandboxes go under `cgroup_parent`.
    pub fn connect(socket: &Path, cgroup_parent: &str) -> io::Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = rt
            .block_on(crate::grpc::unix_channel(
                Endpoint::from_static("http://containerd"),
                socket,
            ))
            .map_err(|e| io::Error::other(format!("connect to {}: {e}", socket.display())))?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            cgroup_parent: cgroup_parent.to_string(),
        })
    }

    fn call<T>(&self, f: impl Future<Output = CriResult<T>>) -> CriResult<T> {
        self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, f)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in 120 s")))
        })
    }

    /// Whether the runtime reports RuntimeReady and NetworkReady (its CNI
    /// config loaded); otherwise the conditions that are not met.
    pub fn ready(&self) -> CriResult<Result<(), String>> {
        let mut c = self.runtime.clone();
        let status = self.call(async move {
            Ok(c.status(api::StatusRequest { verbose: false })
                .await?
                .into_inner())
        })?;
        let unmet: Vec<String> = status
            .status
            .map(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !c.status)
            .map(|c| format!("{}: {} {}", c.r#type, c.reason, c.message))
            .collect();
        Ok(if unmet.is_empty() {
            Ok(())
        } else {
            Err(unmet.join("; "))
        })
    }

    /// Whether the runtime holds `image`.
    pub fn has_image(&self, image: &str) -> CriResult<bool> {
        let mut c = self.images.clone();
        let spec = api::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        self.call(async move {
            let resp = c
                .image_status(api::ImageStatusRequest {
                    image: Some(spec),
                    verbose: false,
                })
                .await?;
            Ok(resp.into_inner().image.is_some())
        })
    }

    fn sandbox_config(&self, pod: &PodConfig) -> api::PodSandboxConfig {
        let pod_scope = api::NamespaceOption {
            network: api::NamespaceMode::Pod as i32,
            pid: api::NamespaceMode::Pod as i32,
            ipc: api::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: pod.name.clone(),
            annotations: pod.annotations.clone().into_iter().collect(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_scope),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox: the sandbox id.
    pub fn run_pod(&self, pod: &PodConfig) -> CriResult<String> {
        self.run_pods(std::slice::from_ref(pod))
            .pop()
            .unwrap_or_else(|| Err(Status::internal("no answer")))
    }

    /// RunPodSandbox for every pod at once; the answers in the pods' order.
    pub fn run_pods(&self, pods: &[PodConfig]) -> Vec<CriResult<String>> {
        let calls = pods.iter().map(|pod| {
            let mut c = self.runtime.clone();
            let req = api::RunPodSandboxRequest {
                config: Some(self.sandbox_config(pod)),
                runtime_handler: String::new(),
            };
            async move { Ok(c.run_pod_sandbox(req).await?.into_inner().pod_sandbox_id) }
        });
        self.all(calls.collect())
    }

    /// PodSandboxStatus (verbose, for the netns path).
    pub fn status(&self, id: &str) -> CriResult<SandboxStatus> {
        let mut c = self.runtime.clone();
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        let resp = self.call(async move { Ok(c.pod_sandbox_status(req).await?.into_inner()) })?;
        let status = resp
            .status
            .ok_or_else(|| Status::internal(format!("no status for sandbox {id}")))?;
        let network = status.network.unwrap_or_default();
        Ok(SandboxStatus {
            ready: status.state == api::PodSandboxState::SandboxReady as i32,
            ip: network.ip,
            additional_ips: network.additional_ips.into_iter().map(|i| i.ip).collect(),
            netns: netns_of(&resp.info),
        })
    }

    /// StopPodSandbox (the runtime's CNI DEL) for every sandbox at once.
    pub fn stop_pods(&self, ids: &[String]) -> Vec<CriResult<()>> {
        let calls = ids.iter().map(|id| {
            let mut c = self.runtime.clone();
            let req = api::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            async move { c.stop_pod_sandbox(req).await.map(drop) }
        });
        self.all(calls.collect())
    }

    /// RemovePodSandbox for every sandbox at once.
    pub fn remove_pods(&self, ids: &[String]) -> Vec<CriResult<()>> {
        let calls = ids.iter().map(|id| {
            let mut c = self.runtime.clone();
            let req = api::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            async move { c.remove_pod_sandbox(req).await.map(drop) }
        });
        self.all(calls.collect())
    }

    /// StopPodSandbox then RemovePodSandbox, as the kubelet ends a pod.
    pub fn stop_and_remove(&self, id: &str) -> CriResult<()> {
        let id = [id.to_string()];
        for answer in [self.stop_pods(&id), self.remove_pods(&id)] {
            answer
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(Status::internal("no answer")))?;
        }
        Ok(())
    }

    /// The ids of every sandbox the runtime knows.
    pub fn list(&self) -> CriResult<Vec<String>> {
        let mut c = self.runtime.clone();
        self.call(async move {
            let resp = c
                .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
                .await?;
            Ok(resp.into_inner().items.into_iter().map(|s| s.id).collect())
        })
    }

    /// Runs the calls concurrently (over the one connection), each under the
    /// call timeout; the answers in order.
    fn all<T: Send + 'static>(
        &self,
        calls: Vec<impl Future<Output = CriResult<T>> + Send + 'static>,
    ) -> Vec<CriResult<T>> {
        self.rt.block_on(async {
            let handles: Vec<_> = calls
                .into_iter()
                .map(|f| tokio::spawn(tokio::time::timeout(CALL_TIMEOUT, f)))
                .collect();
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(match h.await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_)) => Err(Status::deadline_exceeded("no answer in 120 s")),
                    Err(e) => Err(Status::new(Code::Internal, format!("call task: {e}"))),
                });
            }
            out
        })
    }
}

/// The network namespace path in containerd's verbose sandbox info
/// (`info` → `runtimeSpec.linux.namespaces`).
fn netns_of(info: &HashMap<String, String>) -> Option<PathBuf> {
    let info: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .map(PathBuf::from)
}
