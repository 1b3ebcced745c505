//! kubelet's gRPC APIs as Plexus speaks them: the device plugin API
//! (`v1beta1`: kubelet's Registration, a plugin's DevicePlugin) and the
//! PodResources API (`v1`), over kubelet's unix sockets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, clippy::pedantic)]
pub mod deviceplugin {
    tonic::include_proto!("v1beta1");
}

#[allow(clippy::all, clippy::pedantic)]
pub mod podresources {
    tonic::include_proto!("v1");
}

/// The device plugin API's version, as plugins register with it.
pub const VERSION: &str = "v1beta1";
/// Where kubelet's device plugin sockets live.
pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// kubelet's PodResources socket.
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";

/// A channel to the gRPC server on the unix socket `path` (the URI is a
/// placeholder: the connector dials the socket).
pub async fn channel(path: &Path, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
}

/// The devices kubelet allocated to pod `namespace/name`, by resource
/// (every container's together, in kubelet's order): `Get`, or `List` from a
/// kubelet too old for `Get`.
pub fn pod_devices(
    socket: &Path,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, String> {
    use podresources::pod_resources_lister_client::PodResourcesListerClient;
    use podresources::{GetPodResourcesRequest, ListPodResourcesRequest, PodResources};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let pod: Option<PodResources> = rt.block_on(async {
        let channel = channel(socket, timeout)
            .await
            .map_err(|e| format!("kubelet's PodResources at {}: {e}", socket.display()))?;
        let mut client = PodResourcesListerClient::new(channel);
        let got = client
            .get(GetPodResourcesRequest {
                pod_name: name.into(),
                pod_namespace: namespace.into(),
            })
            .await;
        match got {
            Ok(r) => Ok(r.into_inner().pod_resources),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let all = client
                    .list(ListPodResourcesRequest {})
                    .await
                    .map_err(|e| format!("PodResources List: {}", e.message()))?;
                Ok(all
                    .into_inner()
                    .pod_resources
                    .into_iter()
                    .find(|p| p.name == name && p.namespace == namespace))
            }
            Err(s) => Err(format!("PodResources Get: {}", s.message())),
        }
    })?;
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for c in pod.into_iter().flat_map(|p| p.containers) {
        for d in c.devices {
            out.entry(d.resource_name).or_default().extend(d.device_ids);
        }
    }
    Ok(out)
}
