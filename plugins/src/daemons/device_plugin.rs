//! `plexus device-plugin <config.json>`: kubelet's device plugin for SR-IOV
//! virtual functions (`v1beta1`). Pools of VFs are chosen by selectors, as
//! the SR-IOV network device plugin's config has them:
//!
//! ```json
//! {"resourceList": [
//!   {"resourceName": "sriov_a", "resourcePrefix": "plexus.io",
//!    "selectors": {"vendors": ["8086"], "devices": ["10ca"], "drivers": ["igbvf"],
//!                  "pfNames": ["eth1#0-3"]}}],
//!  "deviceDir": "/var/lib/kubelet/device-plugins", "sysfs": "/sys"}
//! ```
//!
//! A pool is served on `<deviceDir>/plexus-<resourceName>.sock` and
//! registered with kubelet (`<deviceDir>/kubelet.sock`); a VF's ID is its
//! PCI address. Every second the VFs are read again from sysfs: a VF whose
//! PF's link is not up is `Unhealthy`, and ListAndWatch sends each change.
//! kubelet restarted (its socket made again) gets every pool registered
//! again. `Allocate` answers with `PCIDEVICE_<RESOURCE>=<addresses>` and, for
//! VFs bound to `vfio-pci`, the `/dev/vfio` devices a DPDK application opens.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::kubelet::deviceplugin::device_plugin_server::{DevicePlugin, DevicePluginServer};
use crate::kubelet::deviceplugin::registration_client::RegistrationClient;
use crate::kubelet::deviceplugin::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, DeviceSpec, Empty,
    ListAndWatchResponse, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse, RegisterRequest,
};
use crate::kubelet::{self, HEALTHY, UNHEALTHY};

/// How often VFs, their health and kubelet's socket are looked at.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub resource_list: Vec<ResourceConf>,
    #[serde(default = "default_device_dir")]
    pub device_dir: PathBuf,
    #[serde(default = "default_sysfs")]
    pub sysfs: PathBuf,
}

fn default_device_dir() -> PathBuf {
    PathBuf::from(kubelet::DEVICE_PLUGIN_DIR)
}

fn default_sysfs() -> PathBuf {
    PathBuf::from("/sys")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceConf {
    pub resource_name: String,
    #[serde(default = "default_prefix")]
    pub resource_prefix: String,
    #[serde(default)]
    pub selectors: Selectors,
}

fn default_prefix() -> String {
    "plexus.io".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selectors {
    #[serde(default)]
    pub vendors: Vec<String>,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub drivers: Vec<String>,
    /// `eth1` (every VF of it), `eth1#0-3`, `eth1#0,2,5-6`.
    #[serde(default)]
    pub pf_names: Vec<String>,
}

impl ResourceConf {
    /// `<prefix>/<name>`, as pods ask for it.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.resource_prefix, self.resource_name)
    }

    /// The socket's file name under the device dir.
    pub fn endpoint(&self) -> String {
        format!("plexus-{}.sock", self.resource_name)
    }

    /// `PCIDEVICE_<PREFIX>_<NAME>`, the variable `Allocate` sets.
    pub fn env_name(&self) -> String {
        let up: String = self
            .full_name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("PCIDEVICE_{up}")
    }
}

impl Config {
    pub fn parse(raw: &[u8]) -> Result<Config, String> {
        let c: Config = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        if c.resource_list.is_empty() {
            return Err("resourceList is empty".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, r) in c.resource_list.iter().enumerate() {
            let ok = !r.resource_name.is_empty()
                && r.resource_name.len() <= 63
                && r.resource_name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
            if !ok {
                return Err(format!(
                    "resourceList[{i}].resourceName {:?} is not 1-63 letters, digits, '-', '_' or '.'",
                    r.resource_name
                ));
            }
            if !seen.insert(r.full_name()) {
                return Err(format!("resourceList[{i}]: {} twice", r.full_name()));
            }
            for (j, pf) in r.selectors.pf_names.iter().enumerate() {
                pf_selector(pf).ok_or_else(|| {
                    format!("resourceList[{i}].selectors.pfNames[{j}] {pf:?} is not <pf>, <pf>#<n>-<m> or <pf>#<n>,<m>")
                })?;
            }
        }
        Ok(c)
    }
}

/// A PF name and the VF indices it allows (`None`: all).
fn pf_selector(s: &str) -> Option<(String, Option<Vec<u32>>)> {
    let (pf, range) = match s.split_once('#') {
        None => return (!s.is_empty()).then(|| (s.to_string(), None)),
        Some(parts) => parts,
    };
    if pf.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for part in range.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a > 4096 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some((pf.to_string(), Some(out)))
}

/// One VF as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vf {
    /// Its PCI address: the device ID kubelet sees.
    pub address: String,
    pub pf_address: String,
    pub pf_name: String,
    pub index: u32,
    pub vendor: String,
    pub device: String,
    pub driver: String,
    /// Whether its PF's link is up.
    pub healthy: bool,
    /// Its IOMMU group, if any (`/dev/vfio/<group>` for vfio-pci).
    pub iommu_group: Option<String>,
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().trim_start_matches("0x").to_string())
        .unwrap_or_default()
}

fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Every VF on the node, from `<sysfs>/bus/pci/devices`.
pub fn discover(sysfs: &Path) -> Vec<Vf> {
    let devices = sysfs.join("bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(&devices) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = devices.join(e.file_name());
        let Some(pf_address) = link_name(&dir.join("physfn")) else {
            continue;
        };
        let address = e.file_name().to_string_lossy().into_owned();
        let pf_dir = devices.join(&pf_address);
        let index = std::fs::read_dir(&pf_dir)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|v| {
                let n = v.file_name().to_string_lossy().into_owned();
                let i: u32 = n.strip_prefix("virtfn")?.parse().ok()?;
                (link_name(&v.path()).as_deref() == Some(address.as_str())).then_some(i)
            });
        let Some(index) = index else { continue };
        let pf_name = std::fs::read_dir(pf_dir.join("net"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|n| n.file_name().to_string_lossy().into_owned())
            .min()
            .unwrap_or_default();
        let healthy = !pf_name.is_empty()
            && read_trim(&pf_dir.join("net").join(&pf_name).join("operstate")) == "up";
        out.push(Vf {
            vendor: read_trim(&dir.join("vendor")),
            device: read_trim(&dir.join("device")),
            driver: link_name(&dir.join("driver")).unwrap_or_default(),
            iommu_group: link_name(&dir.join("iommu_group")),
            address,
            pf_address,
            pf_name,
            index,
            healthy,
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

impl Selectors {
    pub fn matches(&self, vf: &Vf) -> bool {
        let any = |list: &[String], v: &str| {
            list.is_empty()
                || list
                    .iter()
                    .any(|x| x.trim_start_matches("0x").eq_ignore_ascii_case(v))
        };
        any(&self.vendors, &vf.vendor)
            && any(&self.devices, &vf.device)
            && (self.drivers.is_empty() || self.drivers.iter().any(|d| d == &vf.driver))
            && (self.pf_names.is_empty()
                || self
                    .pf_names
                    .iter()
                    .filter_map(|s| pf_selector(s))
                    .any(|(pf, indices)| {
                        pf == vf.pf_name && indices.as_ref().is_none_or(|i| i.contains(&vf.index))
                    }))
    }
}

/// A pool's devices as kubelet sees them.
fn devices_of(vfs: &[Vf], sel: &Selectors) -> Vec<Device> {
    vfs.iter()
        .filter(|vf| sel.matches(vf))
        .map(|vf| Device {
            id: vf.address.clone(),
            health: if vf.healthy { HEALTHY } else { UNHEALTHY }.into(),
            topology: None,
        })
        .collect()
}

/// One pool's service.
struct Pool {
    conf: ResourceConf,
    sysfs: PathBuf,
    devices: watch::Receiver<Vec<Device>>,
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Pool {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let stream = WatchStream::new(self.devices.clone())
            .map(|devices| Ok(ListAndWatchResponse { devices }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let healthy: Vec<String> = self
            .devices
            .borrow()
            .iter()
            .filter(|d| d.health == HEALTHY)
            .map(|d| d.id.clone())
            .collect();
        let container_responses = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                let mut ids = c.must_include_device_i_ds.clone();
                let mut rest: Vec<String> = c
                    .available_device_i_ds
                    .into_iter()
                    .filter(|id| !ids.contains(id))
                    .collect();
                // Healthy ones first, then by address: the same pick every time.
                rest.sort_by_key(|id| (!healthy.contains(id), id.clone()));
                ids.extend(rest);
                ids.truncate(size.max(c.must_include_device_i_ds.len()));
                ContainerPreferredAllocationResponse { device_i_ds: ids }
            })
            .collect();
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        req: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let known: Vec<String> = self.devices.borrow().iter().map(|d| d.id.clone()).collect();
        let vfs = discover(&self.sysfs);
        let mut container_responses = Vec::new();
        for c in req.into_inner().container_requests {
            let mut envs = HashMap::new();
            let mut devices = Vec::new();
            for id in &c.devices_ids {
                if !known.contains(id) {
                    return Err(Status::invalid_argument(format!(
                        "{id} is not a device of {}",
                        self.conf.full_name()
                    )));
                }
                let Some(vf) = vfs.iter().find(|v| &v.address == id) else {
                    return Err(Status::not_found(format!("VF {id} is gone")));
                };
                if vf.driver == "vfio-pci" {
                    let group = vf.iommu_group.clone().ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "VF {id} is bound to vfio-pci but has no IOMMU group"
                        ))
                    })?;
                    for path in ["/dev/vfio/vfio".to_string(), format!("/dev/vfio/{group}")] {
                        if !devices.iter().any(|d: &DeviceSpec| d.host_path == path) {
                            devices.push(DeviceSpec {
                                container_path: path.clone(),
                                host_path: path,
                                permissions: "mrw".into(),
                            });
                        }
                    }
                }
            }
            envs.insert(self.conf.env_name(), c.devices_ids.join(","));
            info!(resource = %self.conf.full_name(), devices = %c.devices_ids.join(","), "allocated");
            container_responses.push(ContainerAllocateResponse {
                envs,
                devices,
                ..Default::default()
            });
        }
        Ok(Response::new(AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// Registers `conf`'s pool with kubelet.
async fn register(device_dir: &Path, conf: &ResourceConf) -> Result<(), String> {
    let channel = kubelet::channel(&device_dir.join("kubelet.sock"), Duration::from_secs(5))
        .await
        .map_err(|e| format!("kubelet's socket: {e}"))?;
    RegistrationClient::new(channel)
        .register(RegisterRequest {
            version: kubelet::VERSION.into(),
            endpoint: conf.endpoint(),
            resource_name: conf.full_name(),
            options: Some(DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true,
            }),
        })
        .await
        .map_err(|e| format!("Register: {}", e.message()))?;
    Ok(())
}

/// Serves `pool` on its socket until the task is aborted.
fn serve(device_dir: &Path, pool: Pool) -> Result<tokio::task::JoinHandle<()>, String> {
    let path = device_dir.join(pool.conf.endpoint());
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = pool.conf.full_name();
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(pool))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
        if let Err(e) = served {
            warn!(resource = %name, error = %e, "device plugin server ended");
        }
    }))
}

/// kubelet's socket's identity: a new one means kubelet started again
/// (its inode may be the old one's again; its change time is not).
fn kubelet_socket(device_dir: &Path) -> Option<(u64, u64, i64, i64)> {
    std::fs::metadata(device_dir.join("kubelet.sock"))
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

async fn run(config: Config) -> Result<(), String> {
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let vfs = discover(&config.sysfs);
    for r in &config.resource_list {
        let (tx, rx) = watch::channel(devices_of(&vfs, &r.selectors));
        info!(resource = %r.full_name(), devices = rx.borrow().len(), "pool");
        senders.push(tx);
        receivers.push(rx);
    }
    let mut servers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut registered_with = None;
    loop {
        // kubelet (re)started: serve every pool afresh and register it. A
        // starting kubelet also removes the plugins' sockets.
        let now = kubelet_socket(&config.device_dir);
        let ours_gone = config
            .resource_list
            .iter()
            .any(|r| !config.device_dir.join(r.endpoint()).exists());
        if now.is_some() && (now != registered_with || ours_gone) {
            for s in servers.drain(..) {
                s.abort();
            }
            let mut all = true;
            for (r, rx) in config.resource_list.iter().zip(&receivers) {
                let pool = Pool {
                    conf: r.clone(),
                    sysfs: config.sysfs.clone(),
                    devices: rx.clone(),
                };
                servers.push(serve(&config.device_dir, pool)?);
                if let Err(e) = register(&config.device_dir, r).await {
                    warn!(resource = %r.full_name(), error = %e, "not registered; trying again");
                    all = false;
                } else {
                    info!(resource = %r.full_name(), endpoint = %r.endpoint(), "registered with kubelet");
                }
            }
            if all {
                registered_with = now;
            }
        }
        tokio::time::sleep(POLL).await;
        let vfs = discover(&config.sysfs);
        for (r, tx) in config.resource_list.iter().zip(&senders) {
            let devices = devices_of(&vfs, &r.selectors);
            tx.send_if_modified(|old| {
                if *old == devices {
                    return false;
                }
                let health: BTreeMap<&str, &str> = devices
                    .iter()
                    .map(|d| (d.id.as_str(), d.health.as_str()))
                    .collect();
                info!(resource = %r.full_name(), devices = ?health, "devices changed");
                *old = devices.clone();
                true
            });
        }
    }
}

pub fn main(config: Option<&str>) -> ExitCode {
    let Some(path) = config else {
        eprintln!("usage: plexus device-plugin <config.json>");
        return ExitCode::from(2);
    };
    let config = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|raw| Config::parse(&raw))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plexus device-plugin: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plexus device-plugin: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plexus device-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pf_selectors_and_names() {
        assert_eq!(pf_selector("eth1"), Some(("eth1".into(), None)));
        assert_eq!(
            pf_selector("eth1#0-2,5"),
            Some(("eth1".into(), Some(vec![0, 1, 2, 5])))
        );
        assert_eq!(pf_selector("eth1#3-1"), None);
        assert_eq!(pf_selector("#1"), None);
        let r = ResourceConf {
            resource_name: "sriov_a".into(),
            resource_prefix: "plexus.io".into(),
            selectors: Selectors::default(),
        };
        assert_eq!(r.env_name(), "PCIDEVICE_PLEXUS_IO_SRIOV_A");
        assert!(Config::parse(br#"{"resourceList": []}"#).is_err());
        assert!(Config::parse(
            br#"{"resourceList": [{"resourceName": "a", "selectors": {"pfNames": ["x#y"]}}]}"#
        )
        .is_err());
    }
}
