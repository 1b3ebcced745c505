//! The pod's request for secondary networks: the `k8s.v1.cni.cncf.io/networks`
//! annotation, as a comma list (`a,ns/b@net2`) or a JSON list of objects.

use std::net::IpAddr;

use cni::config::{validate_ifname, Bandwidth, PortMapping};
use cni::{code, Error};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The annotation that selects networks.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";

/// One network a pod asks for.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Selection {
    pub name: String,
    pub namespace: Option<String>,
    /// Interface name in the pod; `net<N>` when absent.
    pub interface: Option<String>,
    pub ips: Vec<String>,
    pub mac: Option<String>,
    #[serde(rename = "default-route")]
    pub default_route: Vec<IpAddr>,
    #[serde(rename = "cni-args")]
    pub cni_args: Option<Map<String, Value>>,
    #[serde(rename = "portMappings")]
    pub port_mappings: Option<Vec<PortMapping>>,
    pub bandwidth: Option<Bandwidth>,
}

fn malformed(what: impl Into<String>) -> Error {
    Error::new(
        code::INVALID_NETWORK_CONFIG,
        format!("malformed {NETWORKS_ANNOTATION} annotation"),
    )
    .with_details(what)
}

/// Parses the annotation; an empty one asks for nothing.
pub fn parse(annotation: &str) -> Result<Vec<Selection>, Error> {
    let text = annotation.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let selections: Vec<Selection> = if text.starts_with('[') {
        serde_json::from_str(text).map_err(|e| malformed(format!("JSON form: {e}")))?
    } else if text.starts_with('{') {
        return Err(malformed(
            "the JSON form is a list of objects, not an object",
        ));
    } else {
        text.split(',').map(parse_short).collect::<Result<_, _>>()?
    };
    for s in &selections {
        validate(s)?;
    }
    Ok(selections)
}

/// `[namespace/]name[@interface]`
fn parse_short(item: &str) -> Result<Selection, Error> {
    let item = item.trim();
    let (rest, interface) = match item.split_once('@') {
        Some((r, i)) => (r, Some(i.to_string())),
        None => (item, None),
    };
    let (namespace, name) = match rest.split_once('/') {
        Some((ns, n)) => (Some(ns.to_string()), n.to_string()),
        None => (None, rest.to_string()),
    };
    if item.is_empty()
        || name.contains('/')
        || interface.as_deref().is_some_and(|i| i.contains('@'))
    {
        return Err(malformed(format!(
            "element {item:?} is not [namespace/]name[@interface]"
        )));
    }
    Ok(Selection {
        name,
        namespace,
        interface,
        ..Default::default()
    })
}

fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn validate(s: &Selection) -> Result<(), Error> {
    if !is_k8s_name(&s.name) {
        return Err(malformed(format!(
            "network name {:?} is not a Kubernetes object name",
            s.name
        )));
    }
    if let Some(ns) = &s.namespace {
        if !is_k8s_name(ns) {
            return Err(malformed(format!(
                "namespace {ns:?} of {:?} is not valid",
                s.name
            )));
        }
    }
    if let Some(i) = &s.interface {
        validate_ifname(i).map_err(|e| malformed(format!("network {:?}: {e}", s.name)))?;
    }
    for ip in &s.ips {
        if ip.parse::<IpNetwork>().is_err() {
            return Err(malformed(format!(
                "network {:?}: {ip:?} is not an IP address",
                s.name
            )));
        }
    }
    if let Some(mac) = &s.mac {
        let octets: Vec<&str> = mac.split(':').collect();
        let ok = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok());
        if !ok {
            return Err(malformed(format!(
                "network {:?}: {mac:?} is not a MAC address",
                s.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_form() {
        let s = parse(" a, ns1/b@net9 ,c@x").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].name.as_str(), s[0].namespace.as_deref()), ("a", None));
        assert_eq!(s[1].namespace.as_deref(), Some("ns1"));
        assert_eq!(s[1].interface.as_deref(), Some("net9"));
        assert_eq!(s[2].interface.as_deref(), Some("x"));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn json_form() {
        let s = parse(
            r#"[{"name":"mv","namespace":"red","interface":"data0","ips":["10.1.1.5/24"],
                 "mac":"02:00:00:00:00:aa","default-route":["10.1.1.1"]},{"name":"b"}]"#,
        )
        .unwrap();
        assert_eq!(s[0].ips, vec!["10.1.1.5/24".to_string()]);
        assert_eq!(s[0].mac.as_deref(), Some("02:00:00:00:00:aa"));
        assert_eq!(
            s[0].default_route,
            vec!["10.1.1.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(s[1].interface, None);
    }

    #[test]
    fn malformed_is_code_7_and_names_the_problem() {
        for bad in [
            "a,,b",
            "a/b/c",
            "a@b@c",
            "Bad_Name",
            "a@toolonginterfacename",
            "[{\"name\":\"x\"",
            "{\"name\":\"x\"}",
            r#"[{"name":"x","ips":["nope"]}]"#,
            r#"[{"name":"x","mac":"zz:00:00:00:00:00"}]"#,
            r#"[{"interface":"x"}]"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, 7, "{bad}");
            assert!(e.msg.contains(NETWORKS_ANNOTATION), "{bad}");
            assert!(!e.details.is_empty(), "{bad}");
        }
    }
}
