//! Devices for networks that need one, as Multus finds them: a definition
//! annotated `k8s.v1.cni.cncf.io/resourceName` gets, as `deviceID` of its
//! first plugin, a device kubelet allocated to the pod for that resource
//! (kubelet's PodResources API). The n-th such network of a resource gets
//! the n-th device. A `deviceID` the definition already has is kept.

use std::path::Path;
use std::time::Duration;

use cni::{code, Error};
use serde_json::Value;

use super::plan::Delegate;

/// Gives each delegate that needs one its `deviceID`.
pub fn assign(
    delegates: &mut [Delegate],
    socket: &Path,
    namespace: &str,
    pod: &str,
) -> Result<(), Error> {
    let needing: Vec<usize> = delegates
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            d.resource.is_some()
                && d.list
                    .plugins
                    .first()
                    .is_some_and(|p| !p.contains_key("deviceID"))
        })
        .map(|(i, _)| i)
        .collect();
    if needing.is_empty() {
        return Ok(());
    }
    if pod.is_empty() {
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            "a network needs a device, and CNI_ARGS names no K8S_POD_NAME to ask kubelet for it",
        ));
    }
    let devices =
        super::super::kubelet::pod_devices(socket, namespace, pod, Duration::from_secs(5))
            .map_err(|e| Error::new(code::TRY_AGAIN_LATER, e))?;
    let mut taken: std::collections::BTreeMap<String, usize> = Default::default();
    for i in needing {
        let d = &mut delegates[i];
        let resource = d.resource.clone().unwrap_or_default();
        let n = taken.entry(resource.clone()).or_insert(0);
        let Some(id) = devices.get(&resource).and_then(|ids| ids.get(*n)) else {
            let had = devices.get(&resource).map_or(0, Vec::len);
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!(
                    "network {:?} needs a {resource} device, and kubelet allocated {had} to pod {namespace}/{pod} for {} such networks",
                    d.network,
                    *n + 1
                ),
            )
            .with_details("the pod must request the resource in its containers' limits"));
        };
        *n += 1;
        if let Some(first) = d.list.plugins.first_mut() {
            first.insert("deviceID".into(), Value::String(id.clone()));
        }
    }
    Ok(())
}
