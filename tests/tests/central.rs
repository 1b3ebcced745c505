//! The central API: a real `plexusd` with TLS on loopback against a real
//! 3-member etcd (Debian's), certificates made by the test, driven by its
//! own client and by Debian-packaged-style `kubectl` (the one on `PATH`).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use plexus_central::client::{Client, Response};
use serde_json::{json, Value};

use netns_harness::etcd::{EtcdCluster, Tls};
use netns_harness::plexusd::Plexusd;
use netns_harness::scratch::Scratch;

const ADMIN: &str = "admin-token-0123456789";
const TENANT: &str = "tenant-red-token-0123";
const NODE: &str = "node-token-0123456789";
const VIEWER: &str = "viewer-token-01234567";
const NOBODY: &str = "nobody-token-01234567";

/// etcd, plexusd and a client as the admin.
struct Api {
    _scratch: Scratch,
    etcd: EtcdCluster,
    plexusd: Plexusd,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn start(tag: &str) -> Api {
        Api::start_with(tag, &["--max-request-bytes", "65536"])
    }

    fn start_with(tag: &str, flags: &[&str]) -> Api {
        let scratch = Scratch::new(tag).expect("scratch");
        let (server, _client) = Tls::generate(scratch.path()).expect("certificates");
        let etcd = EtcdCluster::start(3).expect("etcd");
        let plexusd = Plexusd::start(
            &scratch,
            &etcd.endpoints(),
            &server,
            &[
                (ADMIN, "alice", &["plexus:admins"]),
                (TENANT, "bob", &["plexus:tenant:red"]),
                (NODE, "node-1", &["plexus:nodes"]),
                (VIEWER, "vic", &["plexus:viewers"]),
                (NOBODY, "eve", &[]),
            ],
            flags,
        )
        .expect("plexusd");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Api {
            _scratch: scratch,
            etcd,
            plexusd,
            rt,
        }
    }

    fn client(&self, token: Option<&str>) -> Client {
        Client::new(&self.plexusd.url(), token, Some(&self.plexusd.ca))
            .expect("client")
            .with_timeouts(Duration::from_secs(10), Duration::from_secs(30))
    }

    /// One request: `(status, body as JSON)`.
    fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let client = self.client(token);
        let r: Response = self
            .rt
            .block_on(client.send(
                method.clone(),
                path,
                body.map(|b| (content_type, Bytes::from(b))),
            ))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (r.status, r.json().unwrap_or(Value::Null))
    }

    fn json(&self, token: &str, method: Method, path: &str, body: &Value) -> (u16, Value) {
        let raw = serde_json::to_vec(body).expect("encode");
        self.call(Some(token), method, path, "application/json", Some(raw))
    }

    fn get(&self, token: &str, path: &str) -> (u16, Value) {
        self.call(Some(token), Method::GET, path, "application/json", None)
    }

    /// The etcd revision a list sees: unchanged when nothing was stored.
    fn revision(&self) -> String {
        let (code, v) = self.get(ADMIN, "/apis/plexus.io/v1/ippools");
        assert_eq!(code, 200, "{v}");
        v["metadata"]["resourceVersion"]
            .as_str()
            .expect("resourceVersion")
            .to_string()
    }
}

const NADS: &str = "/apis/k8s.cni.cncf.io/v1/namespaces";
const POOLS: &str = "/apis/plexus.io/v1/ippools";
const CNETS: &str = "/apis/plexus.io/v1/clusternetworks";

fn nad(ns: &str, name: &str, config: Value) -> Value {
    json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"config": config.to_string()}})
}

fn macvlan(pool: Option<&str>) -> Value {
    let ipam = match pool {
        Some(p) => json!({"type": "plexus-ipam", "pool": p}),
        None => json!({"type": "host-local", "subnet": "10.9.0.0/24"}),
    };
    json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "eth1", "mode": "bridge",
           "ipam": ipam})
}

fn pool(name: &str, cidrs: &[&str]) -> Value {
    json!({"apiVersion": "plexus.io/v1", "kind": "IPPool", "metadata": {"name": name},
           "spec": {"cidrs": cidrs}})
}

fn cnet(name: &str, allowed: &[&str]) -> Value {
    json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork", "metadata": {"name": name},
           "spec": {"config": macvlan(None).to_string(), "allowedNamespaces": allowed}})
}

fn attachment(ns: &str, name: &str, network: &str, pool: &str) -> Value {
    json!({"apiVersion": "plexus.io/v1", "kind": "Attachment",
           "metadata": {"name": name, "namespace": ns, "labels": {"plexus.io/node": "node-1"}},
           "spec": {"pod": name, "node": "node-1", "containerId": "c0ffee", "interface": "net1",
                    "network": network, "addresses": ["10.20.0.5/24"], "pool": pool}})
}

#[test]
fn authorization_matrix_every_role_resource_and_verb() {
    let api = Api::start("authz");
    // What each role may do, written out rather than derived from the server's code.
    let sg = |ns: &str| {
        json!({"apiVersion": "plexus.io/v1", "kind": "SecurityGroup",
               "metadata": {"name": "NAME", "namespace": ns},
               "spec": {"rules": [{"direction": "ingress", "protocol": "tcp",
                                   "portRangeMin": 80, "remoteGroup": "client"}]}})
    };
    let resources: [(&str, &str, Value, Value); 7] = [
        (
            "nad-red",
            "/apis/k8s.cni.cncf.io/v1/namespaces/red/network-attachment-definitions",
            nad("red", "NAME", macvlan(None)),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
        (
            "nad-blue",
            "/apis/k8s.cni.cncf.io/v1/namespaces/blue/network-attachment-definitions",
            nad("blue", "NAME", macvlan(None)),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
        (
            "clusternetwork",
            CNETS,
            cnet("NAME", &["red"]),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
        (
            "ippool",
            POOLS,
            json!({"apiVersion": "plexus.io/v1", "kind": "IPPool", "metadata": {"name": "NAME"},
                   "spec": {"cidrs": ["CIDR"]}}),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
        (
            "attachment-red",
            "/apis/plexus.io/v1/namespaces/red/attachments",
            attachment("red", "NAME", "red/x", ""),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
        (
            "sg-red",
            "/apis/plexus.io/v1/namespaces/red/securitygroups",
            sg("red"),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
        (
            "sg-blue",
            "/apis/plexus.io/v1/namespaces/blue/securitygroups",
            sg("blue"),
            json!({"metadata": {"labels": {"touched": "yes"}}}),
        ),
    ];
    let verbs = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let reads = ["get", "list", "watch"];
    let all: Vec<&str> = verbs.to_vec();
    let mut may: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (res, ..) in &resources {
        let admin = if res.starts_with("attachment") {
            reads.to_vec()
        } else {
            all.clone()
        };
        may.insert(("admin", res), admin);
        may.insert(("viewer", res), reads.to_vec());
        may.insert(
            ("node", res),
            if res.starts_with("attachment") {
                all.clone()
            } else {
                reads.to_vec()
            },
        );
        let tenant = match *res {
            "nad-red" | "sg-red" => all.clone(),
            "attachment-red" => reads.to_vec(),
            _ => vec![],
        };
        may.insert(("tenant", res), tenant);
        may.insert(("nobody", res), vec![]);
    }
    let roles = [
        ("admin", Some(ADMIN)),
        ("tenant", Some(TENANT)),
        ("node", Some(NODE)),
        ("viewer", Some(VIEWER)),
        ("nobody", Some(NOBODY)),
        ("bad-token", Some("not-a-token")),
        ("no-token", None),
    ];
    let mut n = 0;
    let mut checked = 0;
    for (res, collection, template, patch) in &resources {
        for (role, token) in roles {
            for verb in verbs {
                n += 1;
                // A fresh object per request, made by whoever may make it.
                let name = format!("o{n}");
                let cidr = format!("10.{}.{}.0/24", 100 + n / 250, n % 250);
                let mut obj = template.clone();
                obj["metadata"]["name"] = json!(name);
                if let Some(c) = obj.pointer_mut("/spec/cidrs/0") {
                    *c = json!(cidr);
                }
                let maker = if res.starts_with("attachment") {
                    NODE
                } else {
                    ADMIN
                };
                let (code, made) = api.json(maker, Method::POST, collection, &obj);
                assert_eq!(code, 201, "seed {res}: {made}");
                let path = format!("{collection}/{name}");
                let (method, target, ctype, body) = match verb {
                    "get" => (Method::GET, path.clone(), "application/json", None),
                    "list" => (
                        Method::GET,
                        collection.to_string(),
                        "application/json",
                        None,
                    ),
                    "watch" => (
                        Method::GET,
                        format!("{collection}?watch=1&timeoutSeconds=0"),
                        "application/json",
                        None,
                    ),
                    "create" => {
                        let mut o = obj.clone();
                        o["metadata"]["name"] = json!(format!("{name}c"));
                        if let Some(c) = o.pointer_mut("/spec/cidrs/0") {
                            *c = json!(format!("10.{}.{}.0/24", 200 + n / 250, n % 250));
                        }
                        (
                            Method::POST,
                            collection.to_string(),
                            "application/json",
                            Some(o),
                        )
                    }
                    "update" => {
                        let mut o = made.clone();
                        o["metadata"]["labels"] = json!({"updated": "yes"});
                        (Method::PUT, path.clone(), "application/json", Some(o))
                    }
                    "patch" => (
                        Method::PATCH,
                        path.clone(),
                        "application/merge-patch+json",
                        Some(patch.clone()),
                    ),
                    _ => (Method::DELETE, path.clone(), "application/json", None),
                };
                let raw = body.map(|b| serde_json::to_vec(&b).expect("encode"));
                let (code, answer) = api.call(token, method, &target, ctype, raw);
                let expected = match role {
                    "bad-token" | "no-token" => 401,
                    r if may[&(r, *res)].contains(&verb) => 200,
                    _ => 403,
                };
                if expected == 200 {
                    assert!(
                        (200..300).contains(&code),
                        "{role} {verb} {res}: want success, got {code}: {answer}"
                    );
                } else {
                    assert_eq!(code, expected, "{role} {verb} {res}: {answer}");
                    assert_eq!(answer["kind"], "Status", "{answer}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, resources.len() * roles.len() * verbs.len());
}

#[test]
fn stale_writes_conflict_and_what_is_in_use_stays() {
    let api = Api::start("conflict");
    let coll = format!("{NADS}/red/network-attachment-definitions");
    let (code, made) = api.json(
        ADMIN,
        Method::POST,
        &coll,
        &nad("red", "data", macvlan(None)),
    );
    assert_eq!(code, 201, "{made}");
    // Two updates from the same read, at the same time: one wins.
    let path = format!("{coll}/data");
    let bodies: Vec<Vec<u8>> = ["a", "b"]
        .iter()
        .map(|v| {
            let mut o = made.clone();
            o["metadata"]["labels"] = json!({"writer": v});
            serde_json::to_vec(&o).expect("encode")
        })
        .collect();
    let client = api.client(Some(ADMIN));
    let codes: Vec<u16> = api.rt.block_on(async {
        let (a, b) = tokio::join!(
            client.send(
                Method::PUT,
                &path,
                Some(("application/json", Bytes::from(bodies[0].clone())))
            ),
            client.send(
                Method::PUT,
                &path,
                Some(("application/json", Bytes::from(bodies[1].clone())))
            )
        );
        vec![a.expect("a").status, b.expect("b").status]
    });
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![200, 409], "{codes:?}");
    // A stale delete precondition is refused too.
    let stale = json!({"preconditions": {"resourceVersion": made["metadata"]["resourceVersion"]}});
    let (code, v) = api.json(ADMIN, Method::DELETE, &path, &stale);
    assert_eq!(code, 409, "{v}");

    // In use: a pool named by a network, a network with an attachment.
    let (code, v) = api.json(ADMIN, Method::POST, POOLS, &pool("p1", &["10.20.0.0/16"]));
    assert_eq!(code, 201, "{v}");
    let (code, v) = api.json(
        ADMIN,
        Method::POST,
        &coll,
        &nad("red", "pooled", macvlan(Some("p1"))),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = api.json(
        NODE,
        Method::POST,
        "/apis/plexus.io/v1/namespaces/red/attachments",
        &attachment("red", "web-0", "red/pooled", "p1"),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = api.call(
        Some(ADMIN),
        Method::DELETE,
        &format!("{coll}/pooled"),
        "application/json",
        None,
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("red/web-0"),
        "{v}"
    );
    let (code, v) = api.call(
        Some(ADMIN),
        Method::DELETE,
        &format!("{POOLS}/p1"),
        "application/json",
        None,
    );
    assert_eq!(code, 409, "{v}");
    // A network naming a pool that does not exist is refused before storing.
    let (code, v) = api.json(
        ADMIN,
        Method::POST,
        &coll,
        &nad("red", "nopool", macvlan(Some("p9"))),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(
        v["details"]["causes"][0]["field"], "spec.config.ipam.pool",
        "{v}"
    );
    // Once the pod is gone, both go.
    let (code, v) = api.call(
        Some(NODE),
        Method::DELETE,
        "/apis/plexus.io/v1/namespaces/red/attachments/web-0",
        "application/json",
        None,
    );
    assert_eq!(code, 200, "{v}");
    for path in [format!("{coll}/pooled"), format!("{POOLS}/p1")] {
        let (code, v) = api.call(Some(ADMIN), Method::DELETE, &path, "application/json", None);
        assert_eq!(code, 200, "{path}: {v}");
    }
    let (code, _) = api.get(ADMIN, &format!("{POOLS}/p1"));
    assert_eq!(code, 404);
    // The pool plexus-ipam reads went with it.
    assert_eq!(api.etcd.get(0, "/plexus/ipam/pools/p1").expect("etcd"), "");
}

#[test]
fn bad_input_gets_a_clear_4xx_and_stores_nothing() {
    let api = Api::start("badinput");
    let (code, v) = api.json(
        ADMIN,
        Method::POST,
        POOLS,
        &pool("taken", &["10.30.0.0/16"]),
    );
    assert_eq!(code, 201, "{v}");
    let coll = format!("{NADS}/red/network-attachment-definitions");
    let mut unknown = nad("red", "x", macvlan(None));
    unknown["spec"]["colour"] = json!("red");
    let mut unknown_top = nad("red", "x", macvlan(None));
    unknown_top["status2"] = json!({});
    // What, where, content type, body, the code wanted, a word the answer says.
    let sgs = "/apis/plexus.io/v1/namespaces/red/securitygroups".to_string();
    let sg = |rule: Value| {
        json!({"apiVersion": "plexus.io/v1", "kind": "SecurityGroup",
               "metadata": {"name": "web", "namespace": "red"}, "spec": {"rules": [rule]}})
    };
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            &coll,
            "application/json",
            b"{\"apiVersion\": ".to_vec(),
            400,
            "JSON",
        ),
        (
            "malformed YAML",
            &coll,
            "application/yaml",
            b"metadata: [unclosed\n  - :".to_vec(),
            400,
            "YAML",
        ),
        (
            "unknown spec field",
            &coll,
            "application/json",
            serde_json::to_vec(&unknown).unwrap_or_default(),
            422,
            "colour",
        ),
        (
            "unknown top field",
            &coll,
            "application/json",
            serde_json::to_vec(&unknown_top).unwrap_or_default(),
            422,
            "status2",
        ),
        (
            "invalid CIDR",
            POOLS,
            "application/json",
            serde_json::to_vec(&pool("bad", &["10.0.0.0/33"])).unwrap_or_default(),
            422,
            "10.0.0.0/33",
        ),
        (
            "overlapping CIDR",
            POOLS,
            "application/json",
            serde_json::to_vec(&pool("over", &["10.30.128.0/20"])).unwrap_or_default(),
            422,
            "overlaps",
        ),
        (
            "type no node has",
            &coll,
            "application/json",
            serde_json::to_vec(&nad(
                "red",
                "weave",
                json!({"cniVersion": "1.0.0", "type": "weave-net"}),
            ))
            .unwrap_or_default(),
            422,
            "weave-net",
        ),
        (
            "not a DNS label",
            &coll,
            "application/json",
            serde_json::to_vec(&nad("red", "Data_Net", macvlan(None))).unwrap_or_default(),
            422,
            "DNS-1123",
        ),
        (
            "oversized body",
            &coll,
            "application/json",
            {
                let mut big = nad("red", "big", macvlan(None));
                big["metadata"]["annotations"] = json!({"x": "y".repeat(70_000)});
                serde_json::to_vec(&big).unwrap_or_default()
            },
            413,
            "larger than",
        ),
        (
            "namespace mismatch",
            &coll,
            "application/json",
            serde_json::to_vec(&nad("blue", "x", macvlan(None))).unwrap_or_default(),
            400,
            "namespace",
        ),
        (
            "a port range backwards",
            &sgs,
            "application/json",
            serde_json::to_vec(&sg(json!({"direction": "ingress", "protocol": "tcp",
                                           "portRangeMin": 90, "portRangeMax": 80})))
            .unwrap_or_default(),
            422,
            "spec.rules[0].portRangeMax",
        ),
        (
            "an unknown protocol",
            &sgs,
            "application/json",
            serde_json::to_vec(&sg(json!({"direction": "ingress", "protocol": "gre"})))
                .unwrap_or_default(),
            422,
            "spec.rules[0].protocol",
        ),
        (
            "a remote group of another tenant",
            &sgs,
            "application/json",
            serde_json::to_vec(&sg(
                json!({"direction": "ingress", "remoteGroup": "blue/db"}),
            ))
            .unwrap_or_default(),
            422,
            "spec.rules[0].remoteGroup",
        ),
    ];
    for (what, path, ctype, body, want, says) in cases {
        let before = api.revision();
        let (code, v) = api.call(Some(ADMIN), Method::POST, path, ctype, Some(body));
        assert_eq!(code, want, "{what}: {v}");
        assert_eq!(v["kind"], "Status", "{what}: {v}");
        let msg = v.to_string();
        assert!(
            msg.contains(says),
            "{what}: message should say {says:?}: {msg}"
        );
        assert_eq!(api.revision(), before, "{what}: something was stored");
    }
    // Odd bytes in a query, unsupported selectors: answered, the server lives on.
    let (code, v) = api.get(ADMIN, &format!("{POOLS}?x=%\u{20ac}&labelSelector=a%3Db"));
    assert_eq!(code, 200, "{v}");
    let (code, v) = api.get(ADMIN, &format!("{POOLS}?labelSelector=env%20in%20(a%2Cb)"));
    assert_eq!(code, 400, "{v}");
    let (code, v) = api.get(TENANT, "/api/v1/namespaces");
    assert_eq!(code, 403, "{v}");
    // kubectl shows the server's field errors as they are.
    let dir = api.plexusd.dir().to_path_buf();
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: bad\n  namespace: red\nspec:\n  config: '{\"cniVersion\":\"1.0.0\",\"type\":\"plexus-macvlan\",\"mode\":\"fast\"}'\n",
    )
    .expect("write");
    let out = api
        .plexusd
        .kubectl(ADMIN, &["apply", "-f", &file.display().to_string()])
        .expect("kubectl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.config.mode"),
        "{err}"
    );
    // A tenant's SecurityGroup through kubectl: applied, listed, refused
    // when a rule is wrong, with the rule's field named.
    let good = dir.join("sg.yaml");
    std::fs::write(
        &good,
        "apiVersion: plexus.io/v1\nkind: SecurityGroup\nmetadata:\n  name: web\n  namespace: red\nspec:\n  description: web servers\n  rules:\n  - {direction: ingress, protocol: tcp, portRangeMin: 80, portRangeMax: 80, remoteGroup: client}\n  - {direction: ingress, ethertype: IPv6, protocol: icmpv6, icmpType: 128}\n",
    )
    .expect("write");
    let out = api
        .plexusd
        .kubectl(TENANT, &["apply", "-f", &good.display().to_string()])
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = api
        .plexusd
        .kubectl(
            TENANT,
            &["get", "securitygroups", "-n", "red", "-o", "json"],
        )
        .expect("kubectl");
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        listed["items"][0]["spec"]["rules"][0]["remoteGroup"],
        "client"
    );
    let bad = dir.join("sg-bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: plexus.io/v1\nkind: SecurityGroup\nmetadata:\n  name: db\n  namespace: red\nspec:\n  rules:\n  - {direction: ingress, protocol: udp, portRangeMin: 0}\n",
    )
    .expect("write");
    let out = api
        .plexusd
        .kubectl(TENANT, &["apply", "-f", &bad.display().to_string()])
        .expect("kubectl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.rules[0].portRangeMin"),
        "{err}"
    );
}

#[test]
fn acknowledged_writes_survive_member_loss_and_restarts() {
    let mut api = Api::start("durable");
    let coll = format!("{NADS}/red/network-attachment-definitions");
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        if i == 15 {
            let leader = api.etcd.leader().expect("leader");
            api.etcd.stop_member(leader).expect("stop leader");
        }
        if i == 30 {
            api.plexusd.restart().expect("restart plexusd");
        }
        if i == 45 {
            for m in 0..3 {
                if !api.etcd.is_running(m) {
                    api.etcd.restart_member(m).expect("member back");
                }
            }
        }
        let name = format!("net-{i}");
        let client = api.client(Some(ADMIN));
        let body =
            Bytes::from(serde_json::to_vec(&nad("red", &name, macvlan(None))).expect("encode"));
        match api
            .rt
            .block_on(client.send(Method::POST, &coll, Some(("application/json", body))))
        {
            Ok(r) if r.status == 201 => acknowledged.push(name),
            _ => refused += 1,
        }
    }
    assert!(acknowledged.len() >= 40, "{refused} refused of 60");
    api.plexusd.kill();
    api.plexusd.restart().expect("restart");
    let (code, list) = api.get(ADMIN, &coll);
    assert_eq!(code, 200, "{list}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    for n in &acknowledged {
        assert!(names.contains(&n.as_str()), "acknowledged {n} is lost");
    }
}

/// Runs `f` on a thread inside `ns` with a runtime of its own (the API
/// lives on the node's loopback there).
fn in_netns<T: Send>(
    ns: &netns_harness::Netns,
    f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send,
) -> T {
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        f(&rt)
    })
    .expect("enter node netns")
}

fn stdout_ok(what: &str, out: std::io::Result<std::process::Output>) -> String {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A refused pod holds only `lo` and the node keeps no record of it.
fn kept_nothing(
    node: &netns_harness::node::Node,
    ns: &netns_harness::Netns,
    pod: &netns_harness::Pod,
) {
    let links = netns_harness::kernel::link_names(ns.name()).expect("links");
    assert_eq!(links, vec!["lo".to_string()]);
    let records = node.records();
    assert!(
        !records.iter().any(|r| r.contains(&pod.container_id)),
        "{records:?}"
    );
}

#[test]
fn admins_and_tenants_define_pods_attach_and_nodes_record() {
    use netns_harness::node::{Node, UPLINK};
    let node = Node::new("central-e2e");
    let etcd = EtcdCluster::start_in(3, &node.netns).expect("etcd in the node");
    let (server, _) = Tls::generate(node.scratch.path()).expect("certificates");
    let plexusd = Plexusd::start_in(
        &node.scratch,
        &etcd.endpoints(),
        &server,
        &[
            (ADMIN, "alice", &["plexus:admins"]),
            (TENANT, "bob", &["plexus:tenant:red"]),
            (VIEWER, "vic", &["plexus:viewers"]),
        ],
        &[],
        Some(&node.netns),
    )
    .expect("plexusd in the node");
    // Which etcd, node name and state dir IPAM uses is the node's to say.
    let ipam = |pool: &str| json!({"type": "plexus-ipam", "pool": pool});
    // The admin: two pools and the cluster network, with plexusctl.
    let pods_net = json!({"cniVersion": "1.0.0", "type": "plexus-veth", "ipam": ipam("pods-pool")});
    let admin_yaml = format!(
        "apiVersion: plexus.io/v1\nkind: IPPool\nmetadata: {{name: pods-pool}}\n\
         spec: {{cidrs: [10.60.0.0/16, 'fd00:60::/64'], routes: [{{dst: 0.0.0.0/0}}, {{dst: '::/0'}}]}}\n\
         ---\napiVersion: plexus.io/v1\nkind: IPPool\nmetadata: {{name: red-pool}}\n\
         spec: {{cidrs: [192.168.60.0/24, 'fd00:61::/64'], allowedNamespaces: [red]}}\n\
         ---\napiVersion: plexus.io/v1\nkind: ClusterNetwork\nmetadata: {{name: pods}}\n\
         spec: {{allowedNamespaces: [red, blue], config: '{}'}}\n",
        pods_net
    );
    let applied = stdout_ok(
        "plexusctl apply",
        plexusd.plexusctl(ADMIN, &["apply", "-f", "-"], Some(&admin_yaml)),
    );
    assert!(applied.contains("created"), "{applied}");
    // The tenant: its network, with kubectl.
    let data = json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": UPLINK,
                      "mode": "bridge", "ipam": ipam("red-pool")});
    let file = plexusd.dir().join("nad.yaml");
    std::fs::write(
        &file,
        netns_harness::fixtures::nad("data", Some("red"), &data),
    )
    .expect("write");
    let out = stdout_ok(
        "kubectl apply",
        plexusd.kubectl(TENANT, &["apply", "-f", &file.display().to_string()]),
    );
    assert!(out.contains("created"), "{out}");
    // A tenant may not take a pool another namespace owns.
    let mut stolen = data.clone();
    stolen["ipam"]["pool"] = json!("red-pool");
    let stolen_file = plexusd.dir().join("stolen.yaml");
    std::fs::write(
        &stolen_file,
        netns_harness::fixtures::nad("data", Some("blue"), &stolen),
    )
    .expect("write");
    let out = plexusd
        .kubectl(ADMIN, &["apply", "-f", &stolen_file.display().to_string()])
        .expect("kubectl");
    assert!(!out.status.success(), "blue took red's pool");

    let list = node.plexus_list("1.0.0", json!("pods"));
    let mut list = list;
    list.plugins[0].insert(
        "api".into(),
        json!({"endpoints": etcd.endpoints(), "timeoutSeconds": 5}),
    );
    list.plugins[0].insert("nodeName".into(), json!("node-1"));
    list.plugins[0].remove("confDir");
    let (ns_red, pod_red) = node.pod("red");
    let pod_red = pod_red.networks("data");
    let result = node.runtime.add(&list, &pod_red).expect("ADD red");
    let ips: Vec<&str> = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i["address"].as_str())
        .collect();
    let within = |prefixes: &[&str]| {
        ips.iter()
            .filter(|ip| prefixes.iter().any(|p| ip.starts_with(p)))
            .count()
    };
    assert_eq!(
        within(&["10.60.", "fd00:60::"]),
        2,
        "eth0 from pods-pool: {ips:?}"
    );
    assert_eq!(
        within(&["192.168.60.", "fd00:61::"]),
        2,
        "net1 from red-pool: {ips:?}"
    );
    let (ns_blue, pod_blue) = node.pod("blue");
    node.runtime.add(&list, &pod_blue).expect("ADD blue");

    // What is attached, seen through the API (once written: ADD answers
    // before its records are).
    assert!(node.published(), "Attachment publishers still running");
    // Blue's eth0 came from the node's reserve: in use in etcd once its
    // publisher has run.
    netns_harness::fixtures::ipam_published(&node.plexus_cache().join("ipam"));
    let atts = stdout_ok(
        "plexusctl get attachments",
        plexusd.plexusctl(
            VIEWER,
            &["get", "attachments", "-A", "--node", "node-1"],
            None,
        ),
    );
    assert!(
        atts.contains(&pod_red.name) && atts.contains(&pod_blue.name),
        "{atts}"
    );
    assert!(
        atts.contains("red/data") && atts.contains("192.168.60."),
        "{atts}"
    );
    let nads = stdout_ok(
        "kubectl get",
        plexusd.kubectl(VIEWER, &["get", "network-attachment-definitions", "-A"]),
    );
    assert!(nads.contains("red") && nads.contains("data"), "{nads}");
    let usage = stdout_ok(
        "plexusctl ipam usage",
        plexusd.plexusctl(ADMIN, &["ipam", "usage", "red-pool", "-o", "json"], None),
    );
    let usage: Value = serde_json::from_str(&usage).expect("usage JSON");
    assert_eq!(usage["inUse"], json!({"ipv4": 1, "ipv6": 1}), "{usage}");
    let (url, ca) = (plexusd.url(), plexusd.ca.clone());
    let metrics = in_netns(&node.netns, |rt| {
        let c = Client::new(&url, Some(VIEWER), Some(&ca)).expect("client");
        let r = rt
            .block_on(c.send(Method::GET, "/metrics", None))
            .expect("metrics");
        String::from_utf8_lossy(&r.body).into_owned()
    });
    for line in [
        "plexus_attachments{network=\"red/data\"} 1",
        "plexus_attachments{network=\"pods\"} 2",
        "plexus_ipam_addresses_in_use{pool=\"pods-pool\",node=\"node-1\",family=\"ipv6\"} 2",
        "plexusd_requests_total{resource=\"ippools\",verb=\"create\",code=\"201\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // In use: neither the network nor its pool may go.
    let out = plexusd
        .kubectl(TENANT, &["delete", "net-attach-def", "-n", "red", "data"])
        .expect("kubectl");
    assert!(!out.status.success(), "deleted a network in use");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&pod_red.name));

    // Pods of a namespace the cluster network does not allow, or naming
    // another tenant's network, get a clear error and keep nothing.
    let (ns_green, pod_green) = node.pod("green");
    let err = node
        .runtime
        .add(&list, &pod_green)
        .expect_err("green is not allowed");
    assert!(
        err.msg.contains("pods") && err.msg.contains("green"),
        "{}",
        err.msg
    );
    kept_nothing(&node, &ns_green, &pod_green);
    let (ns_b2, pod_b2) = node.pod("blue");
    let err = node
        .runtime
        .add(&list, &pod_b2.clone().networks("red/data"))
        .expect_err("blue may not use red's network");
    assert_eq!(err.code, 7, "{err:?}");
    assert!(err.msg.contains("red/data"), "{}", err.msg);
    kept_nothing(&node, &ns_b2, &pod_b2);

    // DEL removes the records; then the network and pools can go.
    node.runtime.del(&list, &pod_red).expect("DEL red");
    node.runtime.del(&list, &pod_blue).expect("DEL blue");
    node.assert_released(&ns_red, "DEL");
    node.assert_released(&ns_blue, "DEL");
    let atts = plexusd
        .plexusctl(VIEWER, &["get", "attachments", "-A", "-o", "json"], None)
        .expect("plexusctl");
    let atts: Value = serde_json::from_slice(&atts.stdout).expect("JSON list");
    assert_eq!(atts["items"], json!([]), "{atts}");
    stdout_ok(
        "kubectl delete",
        plexusd.kubectl(
            TENANT,
            &[
                "delete",
                "-f",
                &plexusd.dir().join("nad.yaml").display().to_string(),
                "--ignore-not-found",
            ],
        ),
    );
    stdout_ok(
        "plexusctl delete",
        plexusd.plexusctl(ADMIN, &["delete", "clusternetwork", "pods"], None),
    );
    stdout_ok(
        "plexusctl delete",
        plexusd.plexusctl(ADMIN, &["delete", "ippool", "pods-pool"], None),
    );
}

#[test]
fn slow_and_endless_requests_are_cut_off_and_two_servers_share_one_state() {
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = Api::start_with("slow", &["--request-timeout", "2"]);
    let config = plexus_central::tls::client_config(&api.plexusd.ca).expect("CA");
    let port: u16 = api
        .plexusd
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    // Each opens a TLS connection, sends `head`, then waits for the server.
    let linger = |head: &'static str| {
        let config = config.clone();
        api.rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([127, 0, 0, 1]).into(),
            );
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .expect("TLS");
            tls.write_all(head.as_bytes()).await.expect("send");
            let start = Instant::now();
            let mut answer = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut answer)).await;
            (
                start.elapsed(),
                read.is_ok(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        })
    };
    // Headers that never end: the connection is closed.
    let (took, closed, _) = linger("GET /apis HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    assert!(
        closed && took < Duration::from_secs(6),
        "open after {took:?}"
    );
    // A body that never comes: 408, and the connection ends.
    let (took, closed, answer) = linger(concat!(
        "POST /apis/plexus.io/v1/ippools HTTP/1.1\r\nHost: x\r\n",
        "Authorization: Bearer admin-token-0123456789\r\n",
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"kind\""
    ));
    assert!(
        closed && took < Duration::from_secs(6),
        "open after {took:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A second plexusd on the same etcd serves the same objects at once.
    let scratch = Scratch::new("slow-second").expect("scratch");
    let (server, _) = Tls::generate(scratch.path()).expect("certificates");
    let second = Plexusd::start(
        &scratch,
        &api.etcd.endpoints(),
        &server,
        &[(ADMIN, "alice", &["plexus:admins"])],
        &[],
    )
    .expect("second plexusd");
    let (code, made) = api.json(
        ADMIN,
        Method::POST,
        POOLS,
        &pool("shared", &["10.40.0.0/16"]),
    );
    assert_eq!(code, 201, "{made}");
    let other = Client::new(&second.url(), Some(ADMIN), Some(&second.ca)).expect("client");
    let seen = api
        .rt
        .block_on(other.send(Method::GET, &format!("{POOLS}/shared"), None))
        .expect("GET via the second");
    assert_eq!(seen.status, 200);
    let seen = seen.json().expect("JSON");
    assert_eq!(seen["metadata"]["uid"], made["metadata"]["uid"]);
    assert_eq!(
        seen["metadata"]["resourceVersion"],
        made["metadata"]["resourceVersion"]
    );
    // kubectl create refuses what exists, describe shows what is there.
    let file = api.plexusd.dir().join("pool.yaml");
    std::fs::write(
        &file,
        "apiVersion: plexus.io/v1\nkind: IPPool\nmetadata:\n  name: shared\nspec:\n  cidrs: [10.40.0.0/16]\n",
    )
    .expect("write");
    let out = api
        .plexusd
        .kubectl(ADMIN, &["create", "-f", &file.display().to_string()])
        .expect("kubectl");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = api
        .plexusd
        .kubectl(ADMIN, &["describe", "ippool", "shared"])
        .expect("kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("10.40.0.0/16"),
        "{text}"
    );
}
