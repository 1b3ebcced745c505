//! Who is asking and what they may do: bearer tokens from a file in the
//! format of Kubernetes' static token file (`token,user,uid,"group1,group2"`),
//! compared in constant time, and roles given by groups.

use std::path::Path;

use conf::api::{self, Kind};

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// What a group grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `plexus:admins`: every object.
    Admin,
    /// `plexus:tenant:<namespace>`: that namespace's networks and attachments.
    Tenant(String),
    /// `plexus:nodes`: reads definitions and pools, writes attachments.
    Node,
    /// `plexus:viewers`: reads everything.
    Viewer,
}

impl User {
    /// The roles the user's groups give.
    pub fn roles(&self) -> Vec<Role> {
        self.groups
            .iter()
            .filter_map(|g| match g.as_str() {
                "plexus:admins" => Some(Role::Admin),
                "plexus:nodes" => Some(Role::Node),
                "plexus:viewers" => Some(Role::Viewer),
                other => other
                    .strip_prefix("plexus:tenant:")
                    .filter(|ns| api::is_dns_label(ns))
                    .map(|ns| Role::Tenant(ns.to_string())),
            })
            .collect()
    }
}

/// A request's verb, as Kubernetes names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }

    pub fn reads(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

/// Whether `user` may `verb` objects of `kind` in `namespace` (None: cluster
/// scope, or every namespace for a list).
pub fn allowed(user: &User, verb: Verb, kind: &Kind, namespace: Option<&str>) -> bool {
    user.roles().iter().any(|role| match role {
        // An admin removes a node by deleting its Node object.
        Role::Admin => {
            verb.reads() || !kind.node_written || (*kind == api::NODE && verb == Verb::Delete)
        }
        Role::Viewer => verb.reads(),
        Role::Node => kind.node_written || verb.reads(),
        Role::Tenant(ns) => {
            let own = kind.namespaced && namespace == Some(ns.as_str());
            if *kind == api::NAD || *kind == api::SECURITY_GROUP {
                own
            } else if *kind == api::ATTACHMENT {
                own && verb.reads()
            } else {
                false
            }
        }
    })
}

/// Whether `user` may read the server's own figures (`/metrics`).
pub fn may_read_metrics(user: &User) -> bool {
    user.roles()
        .iter()
        .any(|r| matches!(r, Role::Admin | Role::Viewer))
}

/// Whether `user` may list every namespace's name (not tenants).
pub fn may_list_namespaces(user: &User) -> bool {
    user.roles()
        .iter()
        .any(|r| matches!(r, Role::Admin | Role::Viewer | Role::Node))
}

/// The tokens of a static token file.
#[derive(Debug, Default)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, User)>,
}

/// Splits one CSV line, honouring double quotes.
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|f| f.trim().to_string()).collect()
}

impl Tokens {
    /// Parses a token file: `token,user,uid[,"group1,group2"]` per line.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f = csv_fields(line);
            if f.len() < 3 || f[0].is_empty() || f[1].is_empty() {
                return Err(format!("line {}: want token,user,uid[,\"groups\"]", i + 1));
            }
            let groups = f
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            entries.push((
                f[0].as_bytes().to_vec(),
                User {
                    name: f[1].clone(),
                    uid: f[2].clone(),
                    groups,
                },
            ));
        }
        Ok(Tokens { entries })
    }

    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("token file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The user a bearer token names. Every entry is compared, each in time
    /// independent of where the bytes differ, so timing tells nothing.
    pub fn authenticate(&self, token: &[u8]) -> Option<User> {
        let mut found = None;
        for (t, user) in &self.entries {
            if constant_time_eq(t, token) && found.is_none() {
                found = Some(user.clone());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_and_roles() {
        let t = Tokens::parse(
            "# comment\nadm1n,alice,1,\"plexus:admins\"\nred,bob,2,\"plexus:tenant:red,x\"\nn0de,node-1,3,plexus:nodes\nnone,eve,4\n",
        )
        .expect("parses");
        let alice = t.authenticate(b"adm1n").expect("alice");
        assert_eq!(alice.name, "alice");
        assert!(t.authenticate(b"adm1").is_none() && t.authenticate(b"adm1nx").is_none());
        let bob = t.authenticate(b"red").expect("bob");
        assert_eq!(bob.roles(), vec![Role::Tenant("red".into())]);
        assert!(allowed(&bob, Verb::Create, &api::NAD, Some("red")));
        assert!(!allowed(&bob, Verb::Get, &api::NAD, Some("blue")));
        assert!(!allowed(&bob, Verb::List, &api::NAD, None));
        assert!(!allowed(&bob, Verb::Create, &api::ATTACHMENT, Some("red")));
        assert!(allowed(&bob, Verb::List, &api::ATTACHMENT, Some("red")));
        assert!(!allowed(&bob, Verb::Get, &api::IP_POOL, None));
        let node = t.authenticate(b"n0de").expect("node");
        assert!(allowed(&node, Verb::Create, &api::ATTACHMENT, Some("red")));
        assert!(!allowed(&node, Verb::Create, &api::NAD, Some("red")));
        assert!(allowed(&alice, Verb::Delete, &api::IP_POOL, None));
        assert!(!allowed(
            &alice,
            Verb::Create,
            &api::ATTACHMENT,
            Some("red")
        ));
        let eve = t.authenticate(b"none").expect("eve");
        assert!(!allowed(&eve, Verb::Get, &api::NAD, Some("red")));
        assert!(Tokens::parse("just-a-token\n").is_err());
    }
}
