//! kubelet's end of its device plugin API (`v1beta1`: the Registration
//! service, then ListAndWatch, GetPreferredAllocation and Allocate on each
//! registered plugin) and of its PodResources API (`v1`: List and Get,
//! answering with the allocations it made), for tests: kubelet itself is not
//! installable here. Sockets under a directory of the test's own, laid out
//! as kubelet's root: `device-plugins/kubelet.sock`,
//! `pod-resources/kubelet.sock`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

#[allow(clippy::all, clippy::pedantic)]
pub mod deviceplugin {
    tonic::include_proto!("v1beta1");
}

#[allow(clippy::all, clippy::pedantic)]
pub mod podresources {
    tonic::include_proto!("v1");
}

use deviceplugin::device_plugin_client::DevicePluginClient;
use deviceplugin::registration_server::{Registration, RegistrationServer};
use deviceplugin::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest,
    ContainerPreferredAllocationRequest, Empty, PreferredAllocationRequest, RegisterRequest,
};
use podresources::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use podresources::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};

/// Devices kubelet allocated to one container.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub resource: String,
    pub ids: Vec<String>,
}

/// What the fixture knows.
#[derive(Debug, Default)]
pub struct State {
    /// Resource → the plugin's endpoint (socket file name).
    pub plugins: BTreeMap<String, String>,
    /// Resource → its devices and their health, as ListAndWatch last said.
    pub devices: BTreeMap<String, Vec<(String, String)>>,
    /// Registrations accepted since the start.
    pub registrations: usize,
    pub allocations: Vec<Allocation>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct Kubelet {
    root: PathBuf,
    rt: tokio::runtime::Runtime,
    state: Shared,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

struct Registrar {
    dir: PathBuf,
    state: Shared,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        if r.version != "v1beta1" {
            return Err(Status::invalid_argument(format!(
                "unsupported version {}",
                r.version
            )));
        }
        if r.endpoint.contains('/') || r.resource_name.split('/').count() != 2 {
            return Err(Status::invalid_argument("bad endpoint or resource name"));
        }
        {
            let mut s = lock(&self.state);
            s.plugins
                .insert(r.resource_name.clone(), r.endpoint.clone());
            s.registrations += 1;
        }
        // As kubelet does: then it dials the plugin and follows its devices.
        let (socket, state, resource) = (
            self.dir.join(&r.endpoint),
            self.state.clone(),
            r.resource_name,
        );
        tokio::spawn(async move {
            let Ok(channel) = channel(&socket).await else {
                return;
            };
            let Ok(stream) = DevicePluginClient::new(channel)
                .list_and_watch(Empty {})
                .await
            else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(list)) = stream.message().await {
                let devices = list.devices.into_iter().map(|d| (d.id, d.health)).collect();
                lock(&state).devices.insert(resource.clone(), devices);
            }
            lock(&state).devices.remove(&resource);
        });
        Ok(Response::new(Empty {}))
    }
}

struct Lister {
    state: Shared,
}

impl Lister {
    fn pods(&self) -> Vec<PodResources> {
        let s = lock(&self.state);
        let mut pods: BTreeMap<(String, String), BTreeMap<String, Vec<ContainerDevices>>> =
            BTreeMap::new();
        for a in &s.allocations {
            pods.entry((a.namespace.clone(), a.pod.clone()))
                .or_default()
                .entry(a.container.clone())
                .or_default()
                .push(ContainerDevices {
                    resource_name: a.resource.clone(),
                    device_ids: a.ids.clone(),
                    topology: None,
                });
        }
        pods.into_iter()
            .map(|((namespace, name), containers)| PodResources {
                name,
                namespace,
                containers: containers
                    .into_iter()
                    .map(|(name, devices)| ContainerResources {
                        name,
                        devices,
                        cpu_ids: Vec::new(),
                    })
                    .collect(),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl PodResourcesLister for Lister {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods(),
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        let s = lock(&self.state);
        let devices = s
            .devices
            .iter()
            .map(|(r, d)| ContainerDevices {
                resource_name: r.clone(),
                device_ids: d.iter().map(|(id, _)| id.clone()).collect(),
                topology: None,
            })
            .collect();
        Ok(Response::new(AllocatableResourcesResponse {
            devices,
            cpu_ids: Vec::new(),
        }))
    }

    async fn get(
        &self,
        req: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        let r = req.into_inner();
        let pod = self
            .pods()
            .into_iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace)
            .ok_or_else(|| {
                Status::not_found(format!("pod {}/{} not found", r.pod_namespace, r.pod_name))
            })?;
        Ok(Response::new(GetPodResourcesResponse {
            pod_resources: Some(pod),
        }))
    }
}

async fn channel(socket: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_static("http://kubelet")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    crate::grpc::unix_channel(endpoint, socket).await
}

impl Kubelet {
    /// Serves both APIs under `root` (made if missing).
    pub fn start(root: &Path) -> io::Result<Kubelet> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut k = Kubelet {
            root: root.to_path_buf(),
            rt,
            state: Shared::default(),
            servers: Vec::new(),
        };
        k.serve()?;
        Ok(k)
    }

    /// The device plugins' directory (`--device-dir` of the plugin).
    pub fn device_dir(&self) -> PathBuf {
        self.root.join("device-plugins")
    }

    pub fn pod_resources_socket(&self) -> PathBuf {
        self.root.join("pod-resources").join("kubelet.sock")
    }

    fn serve(&mut self) -> io::Result<()> {
        let dir = self.device_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(self.root.join("pod-resources"))?;
        // A starting kubelet removes every socket of the device plugins'
        // directory: plugins must register again.
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_file(self.pod_resources_socket());
        let _guard = self.rt.enter();
        let registration = tokio::net::UnixListener::bind(dir.join("kubelet.sock"))?;
        let resources = tokio::net::UnixListener::bind(self.pod_resources_socket())?;
        let registrar = Registrar {
            dir,
            state: self.state.clone(),
        };
        let lister = Lister {
            state: self.state.clone(),
        };
        self.servers.push(self.rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(registrar))
                .serve_with_incoming(UnixListenerStream::new(registration))
                .await;
        }));
        self.servers.push(self.rt.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(lister))
                .serve_with_incoming(UnixListenerStream::new(resources))
                .await;
        }));
        Ok(())
    }

    /// kubelet restarted: its sockets made anew, every plugin's removed,
    /// nothing registered (allocations kept, as its checkpoint keeps them).
    pub fn restart(&mut self) -> io::Result<()> {
        for s in self.servers.drain(..) {
            s.abort();
        }
        {
            let mut s = lock(&self.state);
            s.plugins.clear();
            s.devices.clear();
        }
        self.serve()
    }

    /// Reads the state.
    pub fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&lock(&self.state))
    }

    /// Waits (at most `limit`) until `pred` holds; whether it did.
    pub fn wait(&self, limit: Duration, pred: impl Fn(&State) -> bool) -> bool {
        let start = Instant::now();
        loop {
            if pred(&lock(&self.state)) {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What kubelet does for a container asking for `count` of `resource`:
    /// the plugin's preferred pick among healthy unallocated devices, then
    /// Allocate; recorded for PodResources.
    pub fn allocate(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        resource: &str,
        count: usize,
    ) -> Result<(Vec<String>, AllocateResponse), String> {
        let (endpoint, available) = {
            let s = lock(&self.state);
            let endpoint = s
                .plugins
                .get(resource)
                .cloned()
                .ok_or_else(|| format!("no plugin registered {resource}"))?;
            let taken: Vec<&String> = s
                .allocations
                .iter()
                .filter(|a| a.resource == resource)
                .flat_map(|a| &a.ids)
                .collect();
            let available: Vec<String> = s
                .devices
                .get(resource)
                .into_iter()
                .flatten()
                .filter(|(id, health)| health == "Healthy" && !taken.contains(&id))
                .map(|(id, _)| id.clone())
                .collect();
            (endpoint, available)
        };
        if available.len() < count {
            return Err(format!(
                "{resource}: {count} wanted, {} available",
                available.len()
            ));
        }
        let socket = self.device_dir().join(endpoint);
        let (ids, response) = self.rt.block_on(async {
            let mut client =
                DevicePluginClient::new(channel(&socket).await.map_err(|e| e.to_string())?);
            let preferred = client
                .get_preferred_allocation(PreferredAllocationRequest {
                    container_requests: vec![ContainerPreferredAllocationRequest {
                        available_device_i_ds: available.clone(),
                        must_include_device_i_ds: Vec::new(),
                        allocation_size: i32::try_from(count).unwrap_or(i32::MAX),
                    }],
                })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let ids = preferred
                .container_responses
                .first()
                .map(|c| c.device_i_ds.clone())
                .unwrap_or_default();
            if ids.len() != count || ids.iter().any(|id| !available.contains(id)) {
                return Err(format!(
                    "preferred allocation {ids:?} is not {count} of {available:?}"
                ));
            }
            let response = client
                .allocate(AllocateRequest {
                    container_requests: vec![ContainerAllocateRequest {
                        devices_ids: ids.clone(),
                    }],
                })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            Ok::<_, String>((ids, response))
        })?;
        lock(&self.state).allocations.push(Allocation {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            resource: resource.into(),
            ids: ids.clone(),
        });
        Ok((ids, response))
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for s in self.servers.drain(..) {
            s.abort();
        }
    }
}
