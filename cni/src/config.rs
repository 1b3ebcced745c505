//! Network configurations, conflists and the runtime's capability arguments.
//!
//! Unknown fields are kept (flattened into `extra`) so that a config passed
//! through Plexus reaches a delegate exactly as written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{code, Error};
use crate::version::Version;

/// One plugin's network configuration (what a plugin reads on stdin).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    #[serde(
        rename = "runtimeConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub runtime_config: Option<RuntimeConfig>,
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<Value>,
    /// GC only: the attachments the runtime still knows.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A list of plugins run in order for one network (a `.conflist`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConfList {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(
        rename = "cniVersions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_versions: Option<Vec<String>>,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "disableCheck", default, skip_serializing_if = "is_false")]
    pub disable_check: bool,
    #[serde(rename = "disableGC", default, skip_serializing_if = "is_false")]
    pub disable_gc: bool,
    /// Each plugin's config, kept as written.
    #[serde(default)]
    pub plugins: Vec<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Capability arguments the runtime injects under `runtimeConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    #[serde(
        rename = "portMappings",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub port_mappings: Option<Vec<PortMapping>>,
    /// Requested static addresses (`10.1.2.3/24` or a bare address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<RuntimeDns>,
    /// The pod's annotations; containerd sends `null` for a pod with none.
    #[serde(
        rename = "io.kubernetes.cri.pod-annotations",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// A device (SR-IOV VF PCI address) handed out by a device plugin.
    #[serde(rename = "deviceID", default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A port mapping (`portMappings` capability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// Traffic shaping (`bandwidth` capability), in bits per second and bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bandwidth {
    #[serde(rename = "ingressRate", default)]
    pub ingress_rate: u64,
    #[serde(rename = "ingressBurst", default)]
    pub ingress_burst: u64,
    #[serde(rename = "egressRate", default)]
    pub egress_rate: u64,
    #[serde(rename = "egressBurst", default)]
    pub egress_burst: u64,
}

/// DNS settings the runtime asks for (`dns` capability).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeDns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub searches: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// One attachment the runtime considers live (GC's `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::new(
            code::DECODING_FAILURE,
            format!("{what} is empty"),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Error::new(code::DECODING_FAILURE, format!("{what} is not valid JSON"))
            .with_details(e.to_string())
    })
}

impl NetConf {
    /// GC's `cni.dev/valid-attachments` as (container id, ifname) pairs.
    pub fn valid_pairs(&self) -> std::collections::HashSet<(String, String)> {
        self.valid_attachments
            .iter()
            .flatten()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect()
    }

    /// Parses a plugin config from stdin bytes and checks what every plugin needs:
    /// a supported `cniVersion` and a valid `name`.
    pub fn parse(bytes: &[u8]) -> Result<(NetConf, Version), Error> {
        let conf: NetConf = decode(bytes, "network configuration")?;
        let version = Version::from_config(&conf.cni_version)?;
        validate_network_name(&conf.name)?;
        Ok((conf, version))
    }
}

impl NetConfList {
    /// Parses a conflist, or a single plugin config promoted to a one-plugin
    /// list (as libcni does), and checks its name, version and plugin types.
    pub fn parse_value(v: &Value) -> Result<NetConfList, Error> {
        let Value::Object(map) = v else {
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                "network configuration must be a JSON object",
            ));
        };
        let list = if map.contains_key("plugins") {
            serde_json::from_value::<NetConfList>(v.clone()).map_err(|e| {
                Error::new(code::INVALID_NETWORK_CONFIG, "invalid conflist")
                    .with_details(e.to_string())
            })?
        } else {
            let mut plugin = map.clone();
            let take = |p: &mut Map<String, Value>, k: &str| match p.remove(k) {
                Some(Value::String(s)) => s,
                _ => String::new(),
            };
            let cni_version = take(&mut plugin, "cniVersion");
            let name = take(&mut plugin, "name");
            NetConfList {
                cni_version,
                name,
                plugins: vec![plugin],
                ..Default::default()
            }
        };
        list.validate()?;
        Ok(list)
    }

    /// Checks version, name and that every plugin names its type.
    pub fn validate(&self) -> Result<(), Error> {
        Version::from_config(&self.cni_version)?;
        validate_network_name(&self.name)?;
        if self.plugins.is_empty() {
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("network {:?} has no plugins", self.name),
            ));
        }
        for (i, p) in self.plugins.iter().enumerate() {
            match p.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && !t.contains('/') => {}
                _ => {
                    return Err(Error::new(
                        code::INVALID_NETWORK_CONFIG,
                        format!("network {:?}: plugin {i} has no valid \"type\"", self.name),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The list's version (validated by [`NetConfList::parse_value`]).
    pub fn version(&self) -> Version {
        self.cni_version.parse().unwrap_or(Version::LATEST)
    }

    /// The type of plugin `i`.
    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins
            .get(i)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// Builds plugin `i`'s stdin as libcni does: the list's `name` and
    /// `cniVersion`, `runtimeConfig` holding only the capabilities the plugin
    /// declares, and `prevResult` when given.
    pub fn plugin_config(
        &self,
        i: usize,
        capability_args: &Map<String, Value>,
        prev_result: Option<&Value>,
    ) -> Map<String, Value> {
        let mut conf = self.plugins.get(i).cloned().unwrap_or_default();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        let declared: Vec<String> = match conf.get("capabilities") {
            Some(Value::Object(caps)) => caps
                .iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .map(|(k, _)| k.clone())
                .collect(),
            _ => Vec::new(),
        };
        let rt: Map<String, Value> = declared
            .into_iter()
            .filter_map(|k| capability_args.get(&k).map(|v| (k, v.clone())))
            .collect();
        if !rt.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rt));
        }
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        conf
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, the rule for network names and container ids.
fn is_id(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (code 7).
pub fn validate_network_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::new(
            code::INVALID_NETWORK_CONFIG,
            "missing network name",
        ));
    }
    if !is_id(name) {
        return Err(Error::new(
            code::INVALID_NETWORK_CONFIG,
            "invalid characters found in network name",
        )
        .with_details(name.to_string()));
    }
    Ok(())
}

/// Container ids: non-empty (code 3), `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (code 4).
pub fn validate_container_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::new(code::UNKNOWN_CONTAINER, "missing containerID"));
    }
    if !is_id(id) {
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            "invalid characters in containerID",
        )
        .with_details(id.to_string()));
    }
    Ok(())
}

/// Interface names as the kernel takes them: 1–15 bytes, not `.`/`..`, no `/`,
/// `:` or white space (code 4).
pub fn validate_ifname(name: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Err(
            Error::new(code::INVALID_ENVIRONMENT, format!("interface name {why}"))
                .with_details(name.to_string()),
        )
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 15 {
        return bad("is longer than 15 characters");
    }
    if name == "." || name == ".." {
        return bad("is . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("contains / or : or white space");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_unknown_fields() {
        let raw = br#"{"cniVersion":"1.0.0","name":"n","type":"ptp","ipMasq":true,
            "runtimeConfig":{"io.kubernetes.cri.pod-annotations":null,"ips":["10.0.0.2/24"],"custom":1}}"#;
        let (conf, v) = NetConf::parse(raw).unwrap();
        assert_eq!(v, Version::V1_0_0);
        assert_eq!(conf.extra["ipMasq"], true);
        let rt = conf.runtime_config.clone().unwrap();
        assert_eq!(rt.pod_annotations, None);
        assert_eq!(rt.ips.as_deref(), Some(&["10.0.0.2/24".to_string()][..]));
        assert_eq!(rt.extra["custom"], 1);
        let back = serde_json::to_value(&conf).unwrap();
        assert_eq!(back["ipMasq"], true);
        assert_eq!(back["runtimeConfig"]["custom"], 1);
    }

    #[test]
    fn parse_errors_have_spec_codes() {
        assert_eq!(
            NetConf::parse(b"").unwrap_err().code,
            code::DECODING_FAILURE
        );
        assert_eq!(
            NetConf::parse(b"{nope").unwrap_err().code,
            code::DECODING_FAILURE
        );
        let old = br#"{"cniVersion":"0.2.0","name":"n","type":"x"}"#;
        assert_eq!(
            NetConf::parse(old).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let noname = br#"{"cniVersion":"1.0.0","type":"x"}"#;
        assert_eq!(
            NetConf::parse(noname).unwrap_err().code,
            code::INVALID_NETWORK_CONFIG
        );
    }

    #[test]
    fn conf_promotes_to_list_and_injects_capabilities() {
        let v = json!({"cniVersion":"0.4.0","name":"n","type":"macvlan",
                       "capabilities":{"ips":true,"mac":false},"master":"eth0"});
        let list = NetConfList::parse_value(&v).unwrap();
        assert_eq!(list.plugins.len(), 1);
        assert_eq!(list.plugin_type(0), "macvlan");
        let caps: Map<String, Value> =
            serde_json::from_value(json!({"ips":["10.0.0.9/24"],"mac":"02:00:00:00:00:01"}))
                .unwrap();
        let prev = json!({"cniVersion":"0.4.0"});
        let c = list.plugin_config(0, &caps, Some(&prev));
        assert_eq!(c["name"], "n");
        assert_eq!(c["cniVersion"], "0.4.0");
        assert_eq!(c["runtimeConfig"], json!({"ips":["10.0.0.9/24"]}));
        assert_eq!(c["prevResult"], prev);
        assert_eq!(c["master"], "eth0");
    }

    #[test]
    fn list_validation() {
        let no_type = json!({"cniVersion":"1.0.0","name":"n","plugins":[{"x":1}]});
        assert_eq!(
            NetConfList::parse_value(&no_type).unwrap_err().code,
            code::INVALID_NETWORK_CONFIG
        );
        let empty = json!({"cniVersion":"1.0.0","name":"n","plugins":[]});
        assert!(NetConfList::parse_value(&empty).is_err());
        assert!(NetConfList::parse_value(&json!([1])).is_err());
    }

    #[test]
    fn names_and_ids() {
        assert!(validate_network_name("a-b_c.d").is_ok());
        assert!(validate_network_name("-a").is_err());
        assert_eq!(
            validate_container_id("").unwrap_err().code,
            code::UNKNOWN_CONTAINER
        );
        assert_eq!(
            validate_container_id("a b").unwrap_err().code,
            code::INVALID_ENVIRONMENT
        );
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a-very-long-name0").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("..").is_err());
    }
}
