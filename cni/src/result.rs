//! Results in every supported version, held in one canonical form.
//!
//! The canonical form is the 1.1.0 result, a superset of the others. Reading
//! accepts 0.3.0 – 1.1.0; writing drops what an older version cannot say and
//! adds what it requires (the `version` of each IP before 1.0.0).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{code, Error};
use crate::version::Version;

/// A plugin's result (ADD output, `prevResult`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Interfaces created or used, host side and sandbox side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes installed in the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings for the sandbox.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// One interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Since 1.1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for sandbox interfaces; absent for host ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Since 1.1.0: vhost-user socket.
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// Since 1.1.0: PCI address of a device (SR-IOV VF).
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Address with prefix length, host bits kept (`10.1.2.3/24`).
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// One route of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Since 1.1.0 (also `advmss`, `priority`, `table`, `scope`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    /// A route to `dst`, via `gw` or on-link, with no further attributes.
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// DNS settings of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

const INTERFACE_1_1_FIELDS: [&str; 3] = ["mtu", "socketPath", "pciID"];
const ROUTE_1_1_FIELDS: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// Reads a result of any supported version; returns the version it was in.
    pub fn from_json(v: &Value) -> Result<(Version, CniResult), Error> {
        let ver = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::new(code::DECODING_FAILURE, "result has no cniVersion"))?;
        let ver = Version::from_config(ver)?;
        let res = serde_json::from_value(v.clone()).map_err(|e| {
            Error::new(code::DECODING_FAILURE, "cannot decode result").with_details(e.to_string())
        })?;
        Ok((ver, res))
    }

    /// Reads a result from bytes (a plugin's stdout).
    pub fn from_slice(bytes: &[u8]) -> Result<(Version, CniResult), Error> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            Error::new(code::DECODING_FAILURE, "result is not JSON").with_details(e.to_string())
        })?;
        Self::from_json(&v)
    }

    /// Writes the result as the given version prints it.
    pub fn to_json(&self, version: Version) -> Value {
        let mut v =
            serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Default::default()));
        let Value::Object(map) = &mut v else {
            unreachable!("a struct serializes to an object")
        };
        if version < Version::V1_1_0 {
            strip(map.get_mut("interfaces"), &INTERFACE_1_1_FIELDS);
            strip(map.get_mut("routes"), &ROUTE_1_1_FIELDS);
        }
        if version < Version::V1_0_0 {
            if let Some(Value::Array(ips)) = map.get_mut("ips") {
                for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                    let family = if cfg.address.is_ipv4() { "4" } else { "6" };
                    ip["version"] = Value::String(family.into());
                }
            }
        }
        map.insert("cniVersion".into(), Value::String(version.as_str().into()));
        v
    }

    /// Appends another result's interfaces and addresses, renumbering its
    /// interface indexes; routes and DNS stay this result's own.
    pub fn append_interfaces(&mut self, other: &CniResult) {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces.iter().cloned());
        self.ips.extend(other.ips.iter().map(|ip| IpConfig {
            interface: ip.interface.map(|i| i + offset),
            ..ip.clone()
        }));
    }
}

fn strip(list: Option<&mut Value>, fields: &[&str]) {
    if let Some(Value::Array(items)) = list {
        for item in items {
            if let Value::Object(m) = item {
                for f in fields {
                    m.remove(*f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_1_1() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "mtu": 1400,
                 "sandbox": "/var/run/netns/p", "socketPath": "/run/vhost.sock"}
            ],
            "ips": [
                {"interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
                {"interface": 1, "address": "fd00::5/64"}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1300, "table": 100}],
            "dns": {"nameservers": ["10.96.0.10"]}
        })
    }

    #[test]
    fn down_converts_to_0_3_1() {
        let (ver, r) = CniResult::from_json(&sample_1_1()).unwrap();
        assert_eq!(ver, Version::V1_1_0);
        let old = r.to_json(Version::V0_3_1);
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][0]["address"], "10.1.0.5/24");
        assert!(old["interfaces"][1].get("mtu").is_none());
        assert!(old["interfaces"][1].get("socketPath").is_none());
        assert!(old["routes"][0].get("table").is_none());
        assert_eq!(old["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn up_converts_from_0_4_0_and_round_trips() {
        let v040 = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"version": "4", "interface": 0, "address": "192.168.1.2/24"}]
        });
        let (ver, r) = CniResult::from_json(&v040).unwrap();
        assert_eq!(ver, Version::V0_4_0);
        let new = r.to_json(Version::V1_0_0);
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(CniResult::from_json(&new).unwrap().1, r);
        assert_eq!(r.to_json(Version::V0_4_0), v040);
    }

    #[test]
    fn rejects_bad_results() {
        assert_eq!(
            CniResult::from_json(&json!({"ips": []})).unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert_eq!(
            CniResult::from_json(&json!({"cniVersion": "0.2.0"}))
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        let bad_ip = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]});
        assert_eq!(
            CniResult::from_json(&bad_ip).unwrap_err().code,
            code::DECODING_FAILURE
        );
    }

    #[test]
    fn append_renumbers_interfaces() {
        let (_, mut a) = CniResult::from_json(&sample_1_1()).unwrap();
        let b = CniResult {
            interfaces: vec![Interface {
                name: "net1".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                interface: Some(0),
                address: "10.2.0.9/24".parse().unwrap(),
                gateway: None,
            }],
            routes: vec![],
            dns: Dns::default(),
        };
        a.append_interfaces(&b);
        assert_eq!(a.interfaces.len(), 3);
        assert_eq!(a.ips[2].interface, Some(2));
        assert_eq!(a.routes.len(), 1);
    }
}
