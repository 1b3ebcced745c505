//! The central API's kinds as etcd holds them: names, keys, and the object
//! shape (Kubernetes' `apiVersion`/`kind`/`metadata`/`spec`). `plexusd` serves
//! them; nodes read definitions and write attachments under the same keys.
//!
//! Key layout, under [`PREFIX`]: `<plural>/<namespace>/<name>` for namespaced
//! kinds, `<plural>/<name>` for cluster-scoped ones. The value is the object
//! without `metadata.resourceVersion`, which is the key's etcd modification
//! revision. An IPPool is also written, in the same transaction, as the pool
//! `plexus-ipam` reads (`/plexus/ipam/pools/<name>`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the API's objects live in etcd.
pub const PREFIX: &str = "/plexus/api/";

/// One kind of object: its API group, names and scope.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The resource name in URLs and keys.
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Written by nodes only; people read it.
    pub node_written: bool,
}

/// Multus' NetworkAttachmentDefinition: a tenant's network.
pub const NAD: Kind = Kind {
    group: "k8s.cni.cncf.io",
    version: "v1",
    kind: "NetworkAttachmentDefinition",
    plural: "network-attachment-definitions",
    singular: "network-attachment-definition",
    namespaced: true,
    short_names: &["net-attach-def"],
    node_written: false,
};

/// An admin-owned network, usable from the namespaces it lists.
pub const CLUSTER_NETWORK: Kind = Kind {
    group: "plexus.io",
    version: "v1",
    kind: "ClusterNetwork",
    plural: "clusternetworks",
    singular: "clusternetwork",
    namespaced: false,
    short_names: &["cnet"],
    node_written: false,
};

/// An address pool `plexus-ipam` draws from.
pub const IP_POOL: Kind = Kind {
    group: "plexus.io",
    version: "v1",
    kind: "IPPool",
    plural: "ippools",
    singular: "ippool",
    namespaced: false,
    short_names: &["pool"],
    node_written: false,
};

/// One interface of one pod on one network, as its node attached it.
pub const ATTACHMENT: Kind = Kind {
    group: "plexus.io",
    version: "v1",
    kind: "Attachment",
    plural: "attachments",
    singular: "attachment",
    namespaced: true,
    short_names: &["att"],
    node_written: true,
};

/// A tenant's stateful security group (OpenStack's model): rules for the
/// interfaces of pods in it, remotes by CIDR or by another group's members.
pub const SECURITY_GROUP: Kind = Kind {
    group: "plexus.io",
    version: "v1",
    kind: "SecurityGroup",
    plural: "securitygroups",
    singular: "securitygroup",
    namespaced: true,
    short_names: &["sg"],
    node_written: false,
};

/// A node that runs the Plexus agent. The agent writes it bound to an etcd
/// lease it keeps renewing, so the object lives while the agent does, and
/// writes it again if it is deleted while the agent runs. An admin deletes
/// it to remove the node; once it has been gone (deleted, or its lease
/// expired) for the grace period, `plexusd` reclaims the node's addresses.
pub const NODE: Kind = Kind {
    group: "plexus.io",
    version: "v1",
    kind: "Node",
    plural: "nodes",
    singular: "node",
    namespaced: false,
    short_names: &["pxnode"],
    node_written: true,
};

/// What a Node object says: when its agent started and the lease it lives by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// RFC 3339.
    pub agent_started: String,
    pub lease_seconds: u64,
}

/// A Node object as its agent writes it.
pub fn node_object(name: &str, spec: &NodeSpec) -> Value {
    serde_json::json!({
        "apiVersion": NODE.api_version(),
        "kind": NODE.kind,
        "metadata": {"name": name, "creationTimestamp": spec.agent_started},
        "spec": spec,
    })
}

/// Every kind the API serves.
pub const KINDS: [&Kind; 6] = [
    &NAD,
    &CLUSTER_NETWORK,
    &IP_POOL,
    &ATTACHMENT,
    &SECURITY_GROUP,
    &NODE,
];

impl Kind {
    /// `group/version`.
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }

    /// The key prefix of every object of this kind (in `namespace`, if given).
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!("{PREFIX}{}/{ns}/", self.plural),
            None => format!("{PREFIX}{}/", self.plural),
        }
    }

    /// The key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(namespace))
    }

    /// The namespace and name a key of this kind names.
    pub fn parse_key<'a>(&self, key: &'a str) -> Option<(Option<&'a str>, &'a str)> {
        let rest = key.strip_prefix(&self.prefix(None))?;
        if self.namespaced {
            let (ns, name) = rest.split_once('/')?;
            Some((Some(ns), name))
        } else {
            Some((None, rest))
        }
    }

    /// The kind served at `/apis/<group>/<version>/<plural>`.
    pub fn by_resource(group: &str, version: &str, plural: &str) -> Option<&'static Kind> {
        KINDS
            .into_iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
    }

    /// The kind an object's `apiVersion` and `kind` name.
    pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Kind> {
        KINDS
            .into_iter()
            .find(|k| k.kind == kind && k.api_version() == api_version)
    }
}

/// A DNS-1123 label: what namespaces and object names must be.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters (pod names).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// `secs` since the epoch as Kubernetes writes timestamps (RFC 3339, UTC).
pub fn rfc3339(secs: u64) -> String {
    // Days to a civil date (proleptic Gregorian), for days >= 0.
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Now, as [`rfc3339`].
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// What an Attachment records: written by the node on ADD, removed on DEL and GC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachmentSpec {
    pub pod: String,
    pub node: String,
    pub container_id: String,
    pub interface: String,
    /// `namespace/name` of a NetworkAttachmentDefinition, or a ClusterNetwork's name.
    pub network: String,
    /// The network's kind: `NetworkAttachmentDefinition` or `ClusterNetwork`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network_kind: String,
    /// Addresses with prefix, as the CNI result gave them.
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The `plexus-ipam` pool the addresses came from, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    /// The security groups of this interface: its filter, and what makes
    /// its addresses members of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

/// An attachment's object name: `<pod>-<ifname>-<first 8 of the container id>`,
/// unique per sandbox and interface, readable in a listing.
pub fn attachment_name(pod: &str, ifname: &str, container_id: &str) -> String {
    let short: String = container_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let ifname: String = ifname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut pod = pod.to_ascii_lowercase();
    pod.truncate(253 - ifname.len() - short.len() - 2);
    format!("{pod}-{ifname}-{short}")
}

/// The Attachment object a node writes.
pub fn attachment_object(namespace: &str, spec: &AttachmentSpec, created: &str) -> Value {
    serde_json::json!({
        "apiVersion": ATTACHMENT.api_version(),
        "kind": ATTACHMENT.kind,
        "metadata": {
            "name": attachment_name(&spec.pod, &spec.interface, &spec.container_id),
            "namespace": namespace,
            "creationTimestamp": created,
            "labels": {"plexus.io/node": spec.node},
        },
        "spec": spec,
    })
}

/// A ClusterNetwork's `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterNetworkSpec {
    pub config: String,
    /// Namespaces whose pods may use it; `*` is every namespace.
    #[serde(default)]
    pub allowed_namespaces: Vec<String>,
}

/// The annotation of a network (NetworkAttachmentDefinition or
/// ClusterNetwork) naming its default security groups, comma-separated; on a
/// pod, the groups it adds (the same list for every network that allows it,
/// or a JSON object from network or interface to a list).
pub const SECURITY_GROUPS_ANNOTATION: &str = "plexus.io/security-groups";

/// The annotation of a network that lets pods add groups of their own
/// (`"true"`).
pub const POD_GROUPS_ANNOTATION: &str = "plexus.io/pod-security-groups";

/// A SecurityGroup's `spec` (validated field by field by plexusd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub rules: Vec<SecurityRule>,
}

/// One stateful rule: traffic it lets in (`ingress`) or out (`egress`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityRule {
    pub direction: String,
    /// `IPv4`, `IPv6`; absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ethertype: Option<String>,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`; absent or `any`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range_min: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range_max: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip_prefix: Option<String>,
    /// A group of the same namespace: its members' addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A NetworkAttachmentDefinition's `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NadSpec {
    #[serde(default)]
    pub config: String,
}

/// Whether `namespace` is in an `allowedNamespaces` list.
pub fn allows(allowed: &[String], namespace: &str) -> bool {
    allowed.iter().any(|a| a == "*" || a == namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_per_scope() {
        let k = NAD.key(Some("red"), "data");
        assert_eq!(k, "/plexus/api/network-attachment-definitions/red/data");
        assert_eq!(NAD.parse_key(&k), Some((Some("red"), "data")));
        let k = IP_POOL.key(Some("ignored"), "pods");
        assert_eq!(k, "/plexus/api/ippools/pods");
        assert_eq!(IP_POOL.parse_key(&k), Some((None, "pods")));
        assert_eq!(
            Kind::by_resource("plexus.io", "v1", "clusternetworks"),
            Some(&CLUSTER_NETWORK)
        );
        assert_eq!(
            Kind::by_kind("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"),
            Some(&NAD)
        );
        assert_eq!(Kind::by_kind("plexus.io/v2", "IPPool"), None);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_651_199), "2026-11-25T23:59:59Z");
    }

    #[test]
    fn names() {
        for ok in ["a", "data-net", "n0", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("web-0.svc"));
        let n = attachment_name("Web-0", "net1", "ABCDEF0123456789");
        assert_eq!(n, "web-0-net1-abcdef01");
        assert!(is_dns_subdomain(&n));
        assert!(allows(&["*".into()], "x") && !allows(&["a".into()], "b"));
    }
}
